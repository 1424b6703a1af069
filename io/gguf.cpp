// GGUF v3 writing: the header and metadata encoding, tensor infos with aligned offsets, f16/bf16/Q8_0
// conversion, and the atomic write (temporary file, fsync, rename).
#include "io/gguf.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/ops.h"

namespace kiln::io {

namespace {

constexpr uint32_t kVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr int64_t kQ8Block = 32;
constexpr size_t kQ8BlockBytes = 2 + kQ8Block;  // f16 scale + 32 int8

// GGUF value types (gguf_type).
enum : uint32_t { kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9, kU64 = 10 };

// Little-endian encoding into a byte string (kiln builds for little-endian hosts only).
struct Encoder {
  std::string bytes;
  template <class T> void pod(T v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof(T)); }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    bytes += s;
  }
  void value(const GGUFValue& v) {
    std::visit(
        [this](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, uint32_t>) pod(kU32), pod(x);
          else if constexpr (std::is_same_v<T, int32_t>) pod(kI32), pod(x);
          else if constexpr (std::is_same_v<T, uint64_t>) pod(kU64), pod(x);
          else if constexpr (std::is_same_v<T, float>) pod(kF32), pod(x);
          else if constexpr (std::is_same_v<T, bool>) pod(kBool), pod<uint8_t>(x ? 1 : 0);
          else if constexpr (std::is_same_v<T, std::string>) pod(kString), str(x);
          else {
            pod(kArray);
            using E = typename T::value_type;
            if constexpr (std::is_same_v<E, std::string>) pod(kString);
            else if constexpr (std::is_same_v<E, int32_t>) pod(kI32);
            else pod(kF32);
            pod<uint64_t>(x.size());
            for (const E& e : x) {
              if constexpr (std::is_same_v<E, std::string>) str(e);
              else pod(e);
            }
          }
        },
        v);
  }
};

uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

std::string errno_text() { return std::strerror(errno); }

// The tensor's values as `type` bytes.
std::string convert(const Tensor& t, GGUFTensorType type) {
  const Tensor f = contiguous(to_device(cast(t, DType::f32), kCPU));  // (numel) f32 on the host
  const float* x = f.data_ptr<float>();
  const int64_t n = f.numel();
  std::string out(gguf_tensor_bytes(t.shape(), type), '\0');
  switch (type) {
    case GGUFTensorType::f32: std::memcpy(out.data(), x, out.size()); break;
    case GGUFTensorType::f16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t b = f16(x[i]).bits;
        std::memcpy(out.data() + 2 * i, &b, 2);
      }
      break;
    case GGUFTensorType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t b = bf16(x[i]).bits;
        std::memcpy(out.data() + 2 * i, &b, 2);
      }
      break;
    case GGUFTensorType::q8_0: quantize_q8_0(x, n, reinterpret_cast<uint8_t*>(out.data())); break;
  }
  return out;
}

}  // namespace

const char* gguf_type_name(GGUFTensorType t) {
  switch (t) {
    case GGUFTensorType::f32: return "f32";
    case GGUFTensorType::f16: return "f16";
    case GGUFTensorType::bf16: return "bf16";
    case GGUFTensorType::q8_0: return "q8_0";
  }
  return "?";
}

GGUFTensorType parse_gguf_type(const std::string& name) {
  for (GGUFTensorType t : {GGUFTensorType::f32, GGUFTensorType::f16, GGUFTensorType::bf16, GGUFTensorType::q8_0})
    if (name == gguf_type_name(t)) return t;
  KILN_FAIL("gguf", "unknown tensor type '{}' (f32, f16, bf16, q8_0)", name);
}

size_t gguf_tensor_bytes(const Shape& shape, GGUFTensorType type) {
  const auto n = static_cast<size_t>(numel(shape));
  switch (type) {
    case GGUFTensorType::f32: return 4 * n;
    case GGUFTensorType::f16:
    case GGUFTensorType::bf16: return 2 * n;
    case GGUFTensorType::q8_0:
      KILN_CHECK(!shape.empty() && shape.back() % kQ8Block == 0, "gguf",
                 "Q8_0 needs rows of a multiple of {} values, found shape {}", kQ8Block, shape_str(shape));
      return n / kQ8Block * kQ8BlockBytes;
  }
  return 0;
}

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
  KILN_CHECK(n % kQ8Block == 0, "gguf", "Q8_0 quantises blocks of {} values, found {} values", kQ8Block, n);
  for (int64_t b = 0; b < n / kQ8Block; ++b, x += kQ8Block, out += kQ8BlockBytes) {
    float amax = 0.0f;
    for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dbits = f16(d).bits;
    std::memcpy(out, &dbits, 2);
    for (int64_t i = 0; i < kQ8Block; ++i) out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[i] * id)));
  }
}

void write_gguf(const std::string& path, const GGUFMetadata& metadata, const std::vector<GGUFTensorInfo>& infos,
                const std::function<Tensor(size_t i)>& tensor_data) {
  // ---- header, metadata and tensor infos (with every offset) in memory first
  GGUFMetadata kv = metadata;
  std::set<std::string> keys;
  for (const auto& [key, value] : kv) KILN_CHECK(keys.insert(key).second, "gguf", "{}: metadata key '{}' given twice", path, key);
  uint64_t alignment = kDefaultAlignment;
  for (const auto& [key, value] : kv)
    if (key == "general.alignment") {
      KILN_CHECK(std::holds_alternative<uint32_t>(value) && std::get<uint32_t>(value) > 0 &&
                     (std::get<uint32_t>(value) & (std::get<uint32_t>(value) - 1)) == 0,
                 "gguf", "{}: general.alignment must be a power of two (UINT32)", path);
      alignment = std::get<uint32_t>(value);
    }
  if (!keys.count("general.alignment")) kv.emplace_back("general.alignment", static_cast<uint32_t>(alignment));
  Encoder e;
  e.bytes = "GGUF";
  e.pod(kVersion);
  e.pod<uint64_t>(infos.size());
  e.pod<uint64_t>(kv.size());
  for (const auto& [key, value] : kv) {
    e.str(key);
    e.value(value);
  }
  std::set<std::string> names;
  std::vector<uint64_t> offsets;
  uint64_t data_size = 0;
  for (const GGUFTensorInfo& info : infos) {
    KILN_CHECK(!info.name.empty() && info.name.size() <= 64, "gguf", "{}: tensor name '{}' must have 1 to 64 bytes", path,
               info.name);
    KILN_CHECK(names.insert(info.name).second, "gguf", "{}: tensor '{}' given twice", path, info.name);
    KILN_CHECK(!info.shape.empty() && info.shape.size() <= 4, "gguf", "{}: tensor '{}' must have 1 to 4 dims, found {}",
               path, info.name, shape_str(info.shape));
    e.str(info.name);
    e.pod<uint32_t>(static_cast<uint32_t>(info.shape.size()));
    for (auto it = info.shape.rbegin(); it != info.shape.rend(); ++it) e.pod<uint64_t>(static_cast<uint64_t>(*it));
    e.pod(static_cast<uint32_t>(info.type));
    data_size = align_up(data_size, alignment);
    offsets.push_back(data_size);
    e.pod<uint64_t>(data_size);
    data_size += gguf_tensor_bytes(info.shape, info.type);
  }
  e.bytes.resize(align_up(e.bytes.size(), alignment), '\0');

  // ---- the file: a temporary next to `path`, renamed over it once complete
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  KILN_CHECK(fd >= 0, "gguf", "{}: cannot create a temporary file next to it: {}", path, errno_text());
  uint64_t written = 0;
  auto put = [&](const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd, p, n);
      if (w < 0 && errno == EINTR) continue;
      KILN_CHECK(w > 0, "gguf", "{}: write failed: {}", path, errno_text());
      p += w, n -= static_cast<size_t>(w), written += static_cast<uint64_t>(w);
    }
  };
  try {
    put(e.bytes.data(), e.bytes.size());
    const uint64_t data_start = written;
    for (size_t i = 0; i < infos.size(); ++i) {
      const Tensor t = tensor_data(i);
      KILN_CHECK(t.defined() && t.shape() == infos[i].shape, "gguf", "{}: tensor '{}' should have shape {}, found {}", path,
                 infos[i].name, shape_str(infos[i].shape), t.defined() ? shape_str(t.shape()) : "undefined");
      const std::string pad(data_start + offsets[i] - written, '\0');
      put(pad.data(), pad.size());
      const std::string bytes = convert(t, infos[i].type);
      put(bytes.data(), bytes.size());
    }
    KILN_CHECK(::fsync(fd) == 0, "gguf", "{}: fsync failed: {}", path, errno_text());
    KILN_CHECK(::fchmod(fd, 0644) == 0, "gguf", "{}: chmod failed: {}", path, errno_text());
    KILN_CHECK(::close(fd) == 0, "gguf", "{}: close failed: {}", path, errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    KILN_FAIL("gguf", "{}: rename failed: {}", path, why);
  }
}

}  // namespace kiln::io

// safetensors reading (mmap, validation of the header against the file) and writing (atomic:
// temporary file, fsync, rename), plus sharded checkpoints with model.safetensors.index.json.
#include "io/safetensors.h"
#include "core/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/ops.h"

namespace kiln::io {

namespace {

using json = nlohmann::json;

const char* st_dtype_name(DType d) {
  switch (d) {
    case DType::f64: return "F64";
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i64: return "I64";
    case DType::i32: return "I32";
    case DType::u8: return "U8";
    case DType::boolean: return "BOOL";
  }
  return "?";
}

bool parse_st_dtype(const std::string& s, DType& out) {
  static const std::pair<const char*, DType> names[] = {
      {"F64", DType::f64}, {"F32", DType::f32}, {"BF16", DType::bf16}, {"F16", DType::f16},
      {"I64", DType::i64}, {"I32", DType::i32}, {"U8", DType::u8},     {"BOOL", DType::boolean}};
  for (const auto& [name, d] : names)
    if (s == name) {
      out = d;
      return true;
    }
  return false;
}

std::string errno_str() { return std::strerror(errno); }

// A non-negative integer JSON value that fits in size_t.
bool as_size(const json& v, size_t& out) {
  if (!v.is_number_unsigned()) return false;
  out = v.get<size_t>();
  return true;
}

// Writes `bytes` pieces to `path` atomically: temporary file in the same folder, fsync, rename.
void write_atomically(const std::string& path, const std::vector<std::pair<const void*, size_t>>& pieces) {
  const char* op = "safetensors";
  std::string tmpl = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmpl.data());
  KILN_CHECK(fd >= 0, op, "{}: cannot create a temporary file next to it: {}", path, errno_str());
  auto fail = [&](const std::string& what) {
    std::string msg = fmt::format("[{}] {}: {}: {}", op, path, what, errno_str());
    ::close(fd);
    ::unlink(tmpl.c_str());
    throw Error(msg);
  };
  for (const auto& [data, size] : pieces) {
    const char* p = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail("write failed");
      p += n;
      left -= static_cast<size_t>(n);
    }
  }
  if (::fchmod(fd, 0644) != 0) fail("chmod failed");
  if (::fsync(fd) != 0) fail("fsync failed");
  if (::close(fd) != 0) {
    std::string msg = fmt::format("[{}] {}: close failed: {}", op, path, errno_str());
    ::unlink(tmpl.c_str());
    throw Error(msg);
  }
  if (::rename(tmpl.c_str(), path.c_str()) != 0) {
    std::string msg = fmt::format("[{}] {}: rename failed: {}", op, path, errno_str());
    ::unlink(tmpl.c_str());
    throw Error(msg);
  }
  // Make the rename itself durable.
  size_t slash = path.find_last_of('/');
  std::string folder = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dfd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

}  // namespace

// ---------------------------------------------------------------- reading

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr != nullptr) ::munmap(addr, size);
  }
  const unsigned char* bytes() const { return static_cast<const unsigned char*>(addr); }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  const std::string op = "safetensors";
  SafetensorsFile f;
  f.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  KILN_CHECK(fd >= 0, op, "{}: cannot open: {}", path, errno_str());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string msg = fmt::format("[{}] {}: cannot stat: {}", op, path, errno_str());
    ::close(fd);
    throw Error(msg);
  }
  size_t file_size = static_cast<size_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    KILN_FAIL(op, "{}: file is {} bytes, shorter than the 8-byte header length", path, file_size);
  }
  auto map = std::make_shared<Mapping>();
  // Private and writable: copy-on-write pages, so tensors may be written without touching the file.
  void* addr = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int mmap_errno = errno;
  ::close(fd);
  KILN_CHECK(addr != MAP_FAILED, op, "{}: mmap of {} bytes failed: {}", path, file_size, std::strerror(mmap_errno));
  map->addr = addr;
  map->size = file_size;
  f.map_ = map;

  const unsigned char* b = map->bytes();
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | b[i];
  KILN_CHECK(header_len <= file_size - 8, op, "{}: header length {} at byte 0 goes beyond the file ({} bytes)", path,
             header_len, file_size);
  f.data_start_ = 8 + static_cast<size_t>(header_len);
  const size_t data_size = file_size - f.data_start_;

  json header;
  try {
    header = json::parse(b + 8, b + f.data_start_);
  } catch (const json::exception& e) {
    KILN_FAIL(op, "{}: malformed JSON header (bytes 8 to {}): {}", path, f.data_start_, e.what());
  }
  KILN_CHECK(header.is_object(), op, "{}: the JSON header is a {}, expected an object", path, header.type_name());

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      KILN_CHECK(value.is_object(), op, "{}: __metadata__ is a {}, expected an object of strings", path,
                 value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        KILN_CHECK(mv.is_string(), op, "{}: __metadata__ entry '{}' is a {}, expected a string", path, mk,
                   mv.type_name());
        f.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    KILN_CHECK(value.is_object(), op, "{}: entry '{}' is a {}, expected an object", path, key, value.type_name());
    TensorInfo info;
    auto dt = value.find("dtype");
    KILN_CHECK(dt != value.end() && dt->is_string(), op, "{}: tensor '{}' has no string 'dtype'", path, key);
    KILN_CHECK(parse_st_dtype(dt->get<std::string>(), info.dtype), op,
               "{}: tensor '{}' has unknown dtype '{}' (expected F64, F32, BF16, F16, I64, I32, U8 or BOOL)", path,
               key, dt->get<std::string>());
    auto sh = value.find("shape");
    KILN_CHECK(sh != value.end() && sh->is_array(), op, "{}: tensor '{}' has no 'shape' array", path, key);
    size_t nbytes = itemsize(info.dtype);
    int64_t numel = 1;
    for (const auto& d : *sh) {
      size_t dim = 0;
      KILN_CHECK(as_size(d, dim) && dim <= static_cast<size_t>(INT64_MAX), op,
                 "{}: tensor '{}' has a shape entry {} that is not a non-negative integer", path, key,
                 d.is_primitive() ? d.dump() : std::string(d.type_name()));  // no dump of deep nesting
      KILN_CHECK(!__builtin_mul_overflow(nbytes, dim, &nbytes) &&
                     !__builtin_mul_overflow(numel, static_cast<int64_t>(dim), &numel),
                 op, "{}: tensor '{}' has a shape whose size overflows", path, key);
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    auto off = value.find("data_offsets");
    KILN_CHECK(off != value.end() && off->is_array() && off->size() == 2 && as_size((*off)[0], info.begin) &&
                   as_size((*off)[1], info.end),
               op, "{}: tensor '{}' needs 'data_offsets' [begin, end] of non-negative integers", path, key);
    KILN_CHECK(info.begin <= info.end, op, "{}: tensor '{}' has data_offsets [{}, {}] with begin after end", path,
               key, info.begin, info.end);
    KILN_CHECK(info.end <= data_size, op,
               "{}: tensor '{}' has data_offsets [{}, {}] beyond the data section ({} bytes, file offset {})", path,
               key, info.begin, info.end, data_size, f.data_start_);
    KILN_CHECK(info.end - info.begin == nbytes, op,
               "{}: tensor '{}' has data_offsets [{}, {}] ({} bytes) but dtype {} shape {} needs {} bytes", path, key,
               info.begin, info.end, info.end - info.begin, dt->get<std::string>(), sh->dump(), nbytes);
    f.infos_.emplace(key, info);
  }

  // The ranges must tile the data section: in offset order, each starts where the previous ended.
  std::vector<std::pair<const std::string*, const TensorInfo*>> order;
  for (const auto& [k, info] : f.infos_) order.emplace_back(&k, &info);
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return std::pair(a.second->begin, a.second->end) < std::pair(b.second->begin, b.second->end);
  });
  size_t expected = 0;
  for (const auto& [k, info] : order) {
    KILN_CHECK(info->begin >= expected, op, "{}: tensor '{}' at data offset {} overlaps the previous tensor (ending at {})",
               path, *k, info->begin, expected);
    KILN_CHECK(info->begin == expected, op, "{}: tensor '{}' starts at data offset {}, leaving a gap after offset {}",
               path, *k, info->begin, expected);
    expected = info->end;
  }
  KILN_CHECK(expected == data_size, op, "{}: tensors end at data offset {} but the data section holds {} bytes", path,
             expected, data_size);
  return f;
}

std::vector<std::string> SafetensorsFile::keys() const {
  std::vector<std::string> out;
  out.reserve(infos_.size());
  for (const auto& [k, info] : infos_) out.push_back(k);
  return out;
}

const TensorInfo& SafetensorsFile::info(const std::string& key) const {
  auto it = infos_.find(key);
  KILN_CHECK(it != infos_.end(), "safetensors", "{}: no tensor named '{}' ({} tensors in the file)", path_, key,
             infos_.size());
  return it->second;
}

Tensor SafetensorsFile::get(const std::string& key) const {
  const TensorInfo& in = info(key);
  unsigned char* p = static_cast<unsigned char*>(map_->addr) + data_start_ + in.begin;
  if (reinterpret_cast<uintptr_t>(p) % itemsize(in.dtype) != 0) {  // misaligned: copy out
    Tensor t = empty(in.shape, in.dtype);
    if (in.end > in.begin) std::memcpy(t.raw_data(), p, in.end - in.begin);
    return t;
  }
  return from_blob(p, in.shape, in.dtype, kCPU, std::shared_ptr<void>(map_));
}

// ---------------------------------------------------------------- writing

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const char* op = "safetensors";
  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  std::vector<Tensor> host;
  host.reserve(tensors.size());
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    KILN_CHECK(!name.empty() && name != "__metadata__", op, "{}: invalid tensor name '{}'", path, name);
    KILN_CHECK(!header.contains(name), op, "{}: tensor name '{}' appears twice", path, name);
    KILN_CHECK(t.defined(), op, "{}: tensor '{}' is undefined", path, name);
    Tensor c = t.detach();
    if (!c.device().is_cpu()) c = c.to(kCPU);
    c = c.contiguous();
    json shape = json::array();
    for (int64_t d : c.shape()) shape.push_back(d);
    header[name] = {{"dtype", st_dtype_name(c.dtype())}, {"shape", shape}, {"data_offsets", {offset, offset + c.nbytes()}}};
    offset += c.nbytes();
    host.push_back(c);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  std::vector<std::pair<const void*, size_t>> pieces{{len, 8}, {text.data(), text.size()}};
  for (const Tensor& t : host)
    if (t.nbytes() > 0) pieces.emplace_back(t.raw_data(), t.nbytes());
  write_atomically(path, pieces);
}

// ---------------------------------------------------------------- sharded checkpoints

ShardedCheckpoint ShardedCheckpoint::open(const std::string& dir) {
  const char* op = "safetensors";
  std::string index_path = join_path(dir, "model.safetensors.index.json");
  const std::string text = read_file(index_path, op);
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    KILN_FAIL(op, "{}: malformed JSON: {}", index_path, e.what());
  }
  KILN_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), op,
             "{}: expected an object with a 'weight_map' object", index_path);
  ShardedCheckpoint ck;
  ck.dir_ = dir;
  for (const auto& [key, file] : index["weight_map"].items()) {
    KILN_CHECK(file.is_string(), op, "{}: weight_map entry '{}' is a {}, expected a file name", index_path, key,
               file.type_name());
    std::string name = file.get<std::string>();
    KILN_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..", op,
               "{}: weight_map entry '{}' names '{}', expected a file in the same folder", index_path, key, name);
    ck.weight_map_[key] = name;
  }
  for (const auto& [key, name] : ck.weight_map_) {
    auto it = ck.shards_.find(name);
    if (it == ck.shards_.end()) it = ck.shards_.emplace(name, SafetensorsFile::open(join_path(dir, name))).first;
    KILN_CHECK(it->second.contains(key), op, "{}: weight_map puts '{}' in {}, which has no such tensor", index_path,
               key, name);
  }
  return ck;
}

std::vector<std::string> ShardedCheckpoint::keys() const {
  std::vector<std::string> out;
  for (const auto& [k, shard] : weight_map_) out.push_back(k);
  return out;
}

const std::string& ShardedCheckpoint::shard_of(const std::string& key) const {
  auto it = weight_map_.find(key);
  KILN_CHECK(it != weight_map_.end(), "safetensors", "{}: no tensor named '{}' in the checkpoint's weight_map",
             join_path(dir_, "model.safetensors.index.json"), key);
  return it->second;
}

Tensor ShardedCheckpoint::get(const std::string& key) const { return shards_.at(shard_of(key)).get(key); }

std::map<std::string, Tensor> ShardedCheckpoint::load_all() const {
  std::map<std::string, Tensor> out;
  for (const auto& [k, shard] : weight_map_) out.emplace(k, shards_.at(shard).get(k));
  return out;
}

std::map<std::string, Tensor> load_sharded(const std::string& dir) { return ShardedCheckpoint::open(dir).load_all(); }

std::vector<std::string> save_sharded(const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
                                      size_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  // Greedy split in the given order.
  std::vector<std::vector<std::pair<std::string, Tensor>>> groups;
  size_t current = 0;
  size_t total = 0;
  for (const auto& [name, t] : tensors) {
    KILN_CHECK(t.defined(), "safetensors", "{}: tensor '{}' is undefined", dir, name);
    size_t nb = t.nbytes();
    if (groups.empty() || (current > 0 && current + nb > max_shard_bytes)) {
      groups.emplace_back();
      current = 0;
    }
    groups.back().emplace_back(name, t);
    current += nb;
    total += nb;
  }
  if (groups.empty()) groups.emplace_back();
  std::vector<std::string> names;
  json weight_map = json::object();
  for (size_t i = 0; i < groups.size(); ++i) {
    std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, groups.size());
    for (const auto& [k, t] : groups[i]) weight_map[k] = name;
    names.push_back(name);
  }
  for (size_t i = 0; i < groups.size(); ++i) save_safetensors(join_path(dir, names[i]), groups[i], metadata);
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::string text = index.dump(2) + "\n";
  write_atomically(join_path(dir, "model.safetensors.index.json"), {{text.data(), text.size()}});
  return names;
}

}  // namespace kiln::io

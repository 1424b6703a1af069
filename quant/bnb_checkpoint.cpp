// Reading and writing the bnb-4bit NF4 layout of transformers' safetensors checkpoints: the packed
// weight, its absmax (8-bit with nested scales, or f32), the quant maps and the JSON quant state.
#include "quant/bnb_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "core/json_int.h"

namespace kiln::quant {
namespace {

using json = nlohmann::json;
constexpr const char* kOp = "bnb_nf4";
constexpr const char* kStateSuffix = ".quant_state.bitsandbytes__nf4";

const char* torch_dtype_name(DType d) {
  switch (d) {
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::f32: return "float32";
    default: KILN_FAIL(kOp, "dtype {} has no bnb name", dtype_name(d));
  }
}

DType dtype_from_torch(const std::string& key, const std::string& s) {
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::f16;
  if (s == "float32") return DType::f32;
  KILN_FAIL(kOp, "{}: dtype must be bfloat16, float16 or float32, found \"{}\"", key, s);
}

// Python's repr of a float (json.dumps writes floats this way): shortest round trip, ".0" on integers.
std::string python_float(double v) {
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".eIn") == std::string::npos) s += ".0";
  return s;
}

using Getter = std::function<Tensor(const std::string& key)>;

NF4Weight read_impl(const Getter& get, const std::string& w_key) {
  const std::string state_key = w_key + kStateSuffix;
  const Tensor state_t = get(state_key);
  KILN_CHECK(state_t.dtype() == DType::u8 && state_t.dim() == 1, kOp, "{}: expected 1-d u8 JSON bytes, found {} ({})",
             state_key, dtype_name(state_t.dtype()), fmt::join(state_t.shape(), ", "));
  const std::vector<uint8_t> bytes = state_t.to_vector<uint8_t>();
  json st;
  try {
    st = json::parse(bytes.begin(), bytes.end());
  } catch (const std::exception& e) {
    KILN_FAIL(kOp, "{}: the quant state is not valid JSON ({})", state_key, e.what());
  }
  KILN_CHECK(st.is_object(), kOp, "{}: the quant state must be a JSON object", state_key);
  auto field = [&](const char* name) -> const json& {
    KILN_CHECK(st.contains(name), kOp, "{}: the quant state has no \"{}\"", state_key, name);
    return st.at(name);
  };
  // Integers only from JSON integers (json_int), the offset only if a float holds it: a cast of 1e300 to
  // float is undefined behaviour.
  auto integer = [&](const json& v, const char* name) {
    return need_json_int(v, kOp, fmt::format("{}: \"{}\"", state_key, name));
  };
  NF4Weight q;
  try {
    const std::string qt = field("quant_type").get<std::string>();
    KILN_CHECK(qt == "nf4", kOp, "{}: quant_type must be \"nf4\", found \"{}\"", state_key, qt);
    q.blocksize = integer(field("blocksize"), "blocksize");
    q.dtype = dtype_from_torch(state_key, field("dtype").get<std::string>());
    q.shape.clear();
    for (const json& d : field("shape").get_ref<const json::array_t&>()) q.shape.push_back(integer(d, "shape"));
    q.double_quant = st.contains("nested_blocksize") || st.contains("nested_offset");
    if (q.double_quant) {
      q.nested_blocksize = integer(field("nested_blocksize"), "nested_blocksize");
      const double offset = field("nested_offset").get<double>();
      KILN_CHECK(std::isfinite(offset) && std::fabs(offset) <= 3.4e38, kOp, "{}: nested_offset {} is not a float32",
                 state_key, offset);
      q.offset = static_cast<float>(offset);
      const std::string nd = field("nested_dtype").get<std::string>();
      KILN_CHECK(nd == "float32", kOp, "{}: nested_dtype must be \"float32\", found \"{}\"", state_key, nd);
    }
  } catch (const nlohmann::json::exception& e) {
    KILN_FAIL(kOp, "{}: a quant state field has the wrong type ({})", state_key, e.what());
  }
  KILN_CHECK(q.blocksize >= 64 && q.blocksize <= 4096 && (q.blocksize & (q.blocksize - 1)) == 0, kOp,
             "{}: blocksize must be a power of two in [64, 4096], found {}", state_key, q.blocksize);
  KILN_CHECK(q.nested_blocksize > 0 && (q.nested_blocksize & (q.nested_blocksize - 1)) == 0, kOp,
             "{}: nested_blocksize must be a power of two, found {}", state_key, q.nested_blocksize);
  KILN_CHECK(!q.shape.empty(), kOp, "{}: shape is empty", state_key);
  int64_t numel = 1;
  for (int64_t d : q.shape) {
    KILN_CHECK(d > 0, kOp, "{}: shape ({}) has a non-positive dim", state_key, fmt::join(q.shape, ", "));
    KILN_CHECK(!__builtin_mul_overflow(numel, d, &numel) && numel < (int64_t{1} << 53), kOp,
               "{}: shape ({}) has too many elements", state_key, fmt::join(q.shape, ", "));
  }

  const int64_t n = q.numel();
  const Tensor packed = get(w_key);
  KILN_CHECK(packed.dtype() == DType::u8, kOp, "{}: packed weight must be u8, found {}", w_key, dtype_name(packed.dtype()));
  KILN_CHECK(packed.numel() == (n + 1) / 2 && (packed.dim() == 1 || (packed.dim() == 2 && packed.size(1) == 1)), kOp,
             "{}: expected ({}, 1) packed bytes for shape ({}), found ({})", w_key, (n + 1) / 2, fmt::join(q.shape, ", "),
             fmt::join(packed.shape(), ", "));
  q.packed = contiguous(packed).reshape({-1});

  const Tensor absmax = get(w_key + ".absmax");
  const DType want = q.double_quant ? DType::u8 : DType::f32;
  KILN_CHECK(absmax.dtype() == want && absmax.dim() == 1, kOp, "{}.absmax: expected 1-d {}, found {} ({})", w_key,
             dtype_name(want), dtype_name(absmax.dtype()), fmt::join(absmax.shape(), ", "));
  KILN_CHECK(absmax.numel() == q.num_blocks(), kOp, "{}.absmax: expected {} entries ({} weights in blocks of {}), found {}",
             w_key, q.num_blocks(), n, q.blocksize, absmax.numel());
  q.absmax = contiguous(absmax);

  const Tensor qmap = get(w_key + ".quant_map");
  KILN_CHECK(qmap.dtype() == DType::f32 && qmap.numel() == 16, kOp, "{}.quant_map: expected f32 (16), found {} ({})",
             w_key, dtype_name(qmap.dtype()), fmt::join(qmap.shape(), ", "));
  const std::vector<float> levels = qmap.to_vector<float>();
  for (size_t i = 0; i < 16; ++i) {
    KILN_CHECK(levels[i] == nf4_levels()[i], kOp, "{}.quant_map: entry {} is {}, the NF4 level is {}", w_key, i,
               levels[i], nf4_levels()[i]);
  }
  if (q.double_quant) {
    const Tensor nested = get(w_key + ".nested_absmax");
    KILN_CHECK(nested.dtype() == DType::f32 && nested.dim() == 1, kOp, "{}.nested_absmax: expected 1-d f32, found {}",
               w_key, dtype_name(nested.dtype()));
    const int64_t nn = (q.num_blocks() + q.nested_blocksize - 1) / std::max<int64_t>(q.nested_blocksize, 1);
    KILN_CHECK(nested.numel() == nn, kOp, "{}.nested_absmax: expected {} entries, found {}", w_key, nn, nested.numel());
    q.nested_absmax = contiguous(nested);
    const Tensor nmap = get(w_key + ".nested_quant_map");
    KILN_CHECK(nmap.dtype() == DType::f32 && nmap.numel() == 256, kOp,
               "{}.nested_quant_map: expected f32 (256), found {} ({})", w_key, dtype_name(nmap.dtype()),
               fmt::join(nmap.shape(), ", "));
    q.nested_code = contiguous(nmap).reshape({256});
  }
  try {
    q.validate(kOp);
  } catch (const Error& e) {
    std::string what = e.what();
    const std::string prefix = std::string("[") + kOp + "] ";
    if (what.rfind(prefix, 0) == 0) what = what.substr(prefix.size());
    KILN_FAIL(kOp, "{}: {}", w_key, what);
  }
  return q;
}

}  // namespace

bool is_bnb_nf4(const io::SafetensorsFile& file, const std::string& weight_key) {
  return file.contains(weight_key + kStateSuffix);
}

NF4Weight read_bnb_nf4(const io::SafetensorsFile& file, const std::string& weight_key) {
  return read_impl(
      [&](const std::string& key) {
        KILN_CHECK(file.contains(key), kOp, "{}: missing from {}", key, file.path());
        return file.get(key);
      },
      weight_key);
}

NF4Weight read_bnb_nf4(const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& weight_key) {
  std::map<std::string, Tensor> by_key(tensors.begin(), tensors.end());
  return read_impl(
      [&](const std::string& key) {
        auto it = by_key.find(key);
        KILN_CHECK(it != by_key.end(), kOp, "{}: missing", key);
        return it->second;
      },
      weight_key);
}

std::string bnb_quant_state_json(const NF4Weight& w) {
  w.validate(kOp);
  std::vector<std::string> dims;
  for (int64_t d : w.shape) dims.push_back(std::to_string(d));
  std::string s = fmt::format(R"({{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": [{}])", w.blocksize,
                              torch_dtype_name(w.dtype), fmt::join(dims, ", "));
  if (w.double_quant) {
    s += fmt::format(R"(, "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {})", w.nested_blocksize,
                     python_float(static_cast<double>(w.offset)));
  }
  return s + "}";
}

std::vector<std::pair<std::string, Tensor>> bnb_nf4_tensors(const std::string& weight_key, const NF4Weight& w) {
  const std::string js = bnb_quant_state_json(w);
  std::vector<uint8_t> bytes(js.begin(), js.end());
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back(weight_key, w.packed.reshape({w.packed.numel(), 1}));
  out.emplace_back(weight_key + ".absmax", w.absmax);
  out.emplace_back(weight_key + ".quant_map", nf4_levels_tensor(kCPU));
  if (w.double_quant) {
    out.emplace_back(weight_key + ".nested_absmax", w.nested_absmax);
    out.emplace_back(weight_key + ".nested_quant_map", w.nested_code);
  }
  out.emplace_back(weight_key + kStateSuffix, from_vector(bytes, {static_cast<int64_t>(bytes.size())}));
  return out;
}

}  // namespace kiln::quant

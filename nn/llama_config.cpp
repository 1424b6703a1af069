// LlamaConfig: Hugging Face config.json in and out, validation, and the built-in named configs
// (the real Llama 3.1 8B and 70B, and a tiny one for the default CPU fine-tune).
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "nn/llama.h"
#include "core/file_io.h"
#include "core/json_int.h"

namespace kiln::nn {

namespace {

using json = nlohmann::json;

// Meta's Llama 3.1 8B (config.json of meta-llama/Llama-3.1-8B).
constexpr const char* kLlama31_8B = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "attention_bias": false, "mlp_bias": false, "bos_token_id": 128000, "eos_token_id": 128001,
  "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256})";

// Meta's Llama 3.1 70B (config.json of meta-llama/Llama-3.1-70B): what FSDP over several GPUs is for.
constexpr const char* kLlama31_70B = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "attention_bias": false, "mlp_bias": false, "bos_token_id": 128000, "eos_token_id": 128001,
  "hidden_size": 8192, "intermediate_size": 28672, "max_position_embeddings": 131072,
  "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 128256})";

// The default fine-tune's model: Llama 3.1's architecture at a size a 2-core CPU trains in minutes,
// over the default tokenizer's 4,096-token vocabulary. Its random weights are drawn wider than HF's
// 0.02 so that a frozen random base still gives LoRA features to work with (the loss then falls from
// ln(4096) = 8.3 to about 6.6 in 400 steps).
constexpr const char* kTiny = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "bos_token_id": 3840, "eos_token_id": 3841, "hidden_size": 256, "intermediate_size": 704,
  "max_position_embeddings": 2048, "num_attention_heads": 8, "num_hidden_layers": 4, "num_key_value_heads": 2,
  "head_dim": 32, "rms_norm_eps": 1e-05, "initializer_range": 0.05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 256, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "float32", "vocab_size": 4096})";

const std::map<std::string, const char*>& named_configs() {
  static const std::map<std::string, const char*> m{{"llama3.1-8b", kLlama31_8B}, {"llama3.1-70b", kLlama31_70B}, {"tiny", kTiny}};
  return m;
}

DType dtype_from_torch(const std::string& s, const std::string& source) {
  if (s == "float32") return DType::f32;
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::f16;
  KILN_FAIL("llama config", "{}: unsupported torch_dtype '{}' (float32, bfloat16, float16)", source, s);
}

const char* torch_dtype_name(DType d) {
  switch (d) {
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    default: return "float32";
  }
}

}  // namespace

LlamaConfig LlamaConfig::from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    KILN_FAIL("llama config", "{}: invalid JSON: {}", source, e.what());
  }
  KILN_CHECK(j.is_object(), "llama config", "{}: expected a JSON object", source);
  LlamaConfig c;
  try {
    if (j.contains("model_type"))
      KILN_CHECK(j["model_type"] == "llama", "llama config", "{}: model_type is {}, expected \"llama\"", source,
                 j["model_type"].dump());
    auto integer = [&](const json& v, const std::string& key) {
      return need_json_int(v, "llama config", fmt::format("{}: '{}'", source, key));
    };
    auto optional_integer = [&](const char* key, int64_t fallback) {
      return j.contains(key) && !j[key].is_null() ? integer(j[key], key) : fallback;
    };
    auto need = [&](const char* key) -> int64_t {
      KILN_CHECK(j.contains(key), "llama config", "{}: missing integer '{}'", source, key);
      return integer(j[key], key);
    };
    c.vocab_size = need("vocab_size");
    c.hidden_size = need("hidden_size");
    c.intermediate_size = need("intermediate_size");
    c.num_hidden_layers = need("num_hidden_layers");
    c.num_attention_heads = need("num_attention_heads");
    c.num_key_value_heads = optional_integer("num_key_value_heads", c.num_attention_heads);
    c.head_dim = optional_integer("head_dim", c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0);
    c.max_position_embeddings = optional_integer("max_position_embeddings", 2048);
    c.rms_norm_eps = j.value("rms_norm_eps", 1e-6);
    // transformers >= 5 writes the RoPE settings as "rope_parameters" (theta and scaling together)
    const json* rope = j.contains("rope_parameters") && j["rope_parameters"].is_object() ? &j["rope_parameters"] : nullptr;
    c.rope_theta = rope && rope->contains("rope_theta") ? rope->at("rope_theta").get<double>() : j.value("rope_theta", 10000.0);
    c.initializer_range = j.value("initializer_range", 0.02);
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    c.attention_bias = j.value("attention_bias", false);
    c.mlp_bias = j.value("mlp_bias", false);
    if (j.contains("hidden_act"))
      KILN_CHECK(j["hidden_act"] == "silu", "llama config", "{}: hidden_act {} is not supported (silu)", source,
                 j["hidden_act"].dump());
    if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"];
    if (j.contains("eos_token_id")) {
      const json& e = j["eos_token_id"];
      if (e.is_number_integer()) c.eos_token_ids = {integer(e, "eos_token_id")};
      else if (e.is_array())
        for (const json& id : e) c.eos_token_ids.push_back(integer(id, "eos_token_id"));
    }
    for (const char* key : {"torch_dtype", "dtype"})  // "dtype" in transformers >= 5
      if (j.contains(key) && j[key].is_string()) c.torch_dtype = dtype_from_torch(j[key], source);
    const json* scaling = j.contains("rope_scaling") && !j["rope_scaling"].is_null() ? &j["rope_scaling"] : rope;
    if (scaling) {
      const json& r = *scaling;
      const std::string type = r.value("rope_type", r.value("type", std::string(scaling == rope ? "default" : "")));
      KILN_CHECK(type == "llama3" || type == "default", "llama config",
                 "{}: rope_scaling type '{}' is not supported (llama3 or default)", source, type);
      if (type == "llama3") {
        RopeScaling s;
        s.factor = r.at("factor").get<double>();
        s.low_freq_factor = r.at("low_freq_factor").get<double>();
        s.high_freq_factor = r.at("high_freq_factor").get<double>();
        s.original_max_position_embeddings = integer(r.at("original_max_position_embeddings"), "original_max_position_embeddings");
        c.rope_scaling = s;
      }
    }
  } catch (const json::exception& e) {
    KILN_FAIL("llama config", "{}: {}", source, e.what());
  }
  try {
    c.validate();
  } catch (const Error& e) {
    KILN_FAIL("llama config", "{}: {}", source, e.what());
  }
  return c;
}

LlamaConfig LlamaConfig::from_file(const std::string& path) { return from_json(read_file(path, "llama config"), path); }

LlamaConfig LlamaConfig::named(const std::string& name_or_path) {
  auto it = named_configs().find(name_or_path);
  if (it != named_configs().end()) return from_json(it->second, name_or_path);
  namespace fs = std::filesystem;
  if (fs::is_directory(name_or_path)) return from_file((fs::path(name_or_path) / "config.json").string());
  KILN_CHECK(fs::exists(name_or_path), "llama config", "'{}' is neither a known config (llama3.1-8b, llama3.1-70b, tiny) nor a file",
             name_or_path);
  return from_file(name_or_path);
}

void LlamaConfig::validate() const {
  KILN_CHECK(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 && num_hidden_layers > 0 &&
                 num_attention_heads > 0 && num_key_value_heads > 0 && head_dim > 0,
             "llama config", "sizes must be positive: vocab {}, hidden {}, intermediate {}, layers {}, heads {}, kv heads {}, head_dim {}",
             vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim);
  KILN_CHECK(num_attention_heads % num_key_value_heads == 0, "llama config",
             "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", num_attention_heads,
             num_key_value_heads);
  KILN_CHECK(head_dim % 2 == 0, "llama config", "head_dim must be even for rotary embeddings, found {}", head_dim);
  KILN_CHECK(initializer_range > 0, "llama config", "initializer_range must be positive, found {}", initializer_range);
  KILN_CHECK(rms_norm_eps >= 0 && rope_theta > 1, "llama config", "need rms_norm_eps >= 0 and rope_theta > 1, found {} and {}",
             rms_norm_eps, rope_theta);
  (void)num_parameters();  // a kiln::Error where the sizes' product leaves int64
}

int64_t LlamaConfig::num_parameters() const {
  // Sizes come from outside (config.json): a count that leaves int64 is an error, not an overflow.
  const auto mul = [](int64_t a, int64_t b) {
    int64_t r = 0;
    KILN_CHECK(!__builtin_mul_overflow(a, b, &r), "llama config", "the parameter count overflows 64 bits ({} x {})", a, b);
    return r;
  };
  const auto add = [](int64_t a, int64_t b) {
    int64_t r = 0;
    KILN_CHECK(!__builtin_add_overflow(a, b, &r), "llama config", "the parameter count overflows 64 bits ({} + {})", a, b);
    return r;
  };
  const int64_t attn = mul(mul(hidden_size, head_dim), add(mul(2, num_attention_heads), mul(2, num_key_value_heads)));
  const int64_t mlp = mul(mul(3, hidden_size), intermediate_size);
  const int64_t per_layer = add(add(attn, mlp), mul(2, hidden_size));
  const int64_t embeddings = mul(mul(vocab_size, hidden_size), tie_word_embeddings ? 1 : 2);
  return add(add(embeddings, mul(num_hidden_layers, per_layer)), hidden_size);
}

std::string LlamaConfig::to_json() const {
  json j{{"architectures", {"LlamaForCausalLM"}},
         {"model_type", "llama"},
         {"hidden_act", "silu"},
         {"vocab_size", vocab_size},
         {"hidden_size", hidden_size},
         {"intermediate_size", intermediate_size},
         {"num_hidden_layers", num_hidden_layers},
         {"num_attention_heads", num_attention_heads},
         {"num_key_value_heads", num_key_value_heads},
         {"head_dim", head_dim},
         {"max_position_embeddings", max_position_embeddings},
         {"rms_norm_eps", rms_norm_eps},
         {"rope_theta", rope_theta},
         {"initializer_range", initializer_range},
         {"tie_word_embeddings", tie_word_embeddings},
         {"attention_bias", attention_bias},
         {"mlp_bias", mlp_bias},
         {"torch_dtype", torch_dtype_name(torch_dtype)}};
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  else if (!eos_token_ids.empty()) j["eos_token_id"] = eos_token_ids;
  if (rope_scaling)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling->factor},
                         {"low_freq_factor", rope_scaling->low_freq_factor},
                         {"high_freq_factor", rope_scaling->high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling->original_max_position_embeddings}};
  else
    j["rope_scaling"] = nullptr;
  return j.dump(2);
}

}  // namespace kiln::nn

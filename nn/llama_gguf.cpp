// Llama -> GGUF: llama.cpp's tensor names and q/k permutation, the llama3 rope factors, the metadata
// keys and the byte-level BPE vocabulary from tokenizer.json, and the file written tensor by tensor.
#include "nn/llama_gguf.h"

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <regex>
#include <tuple>

#include "autograd/grad_mode.h"
#include "core/file_io.h"
#include "core/json_int.h"
#include "core/ops.h"
#include "nn/lora.h"
#include "nn/merge.h"

namespace kiln::nn {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

enum : int32_t { kNormal = 1, kControl = 3, kUserDefined = 4, kUnused = 5 };

json parse_json_file(const fs::path& p) {
  const std::string text = read_file(p.string(), "gguf");
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    KILN_FAIL("gguf", "{}: invalid JSON: {}", p.string(), e.what());
  }
}

// tokenizer_config.json spells a special token as a string or as {"content": ...}.
std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

// convert_hf_to_gguf's file types (llama_ftype) by tensor type.
uint32_t file_type(io::GGUFTensorType t) {
  switch (t) {
    case io::GGUFTensorType::f32: return 0;
    case io::GGUFTensorType::f16: return 1;
    case io::GGUFTensorType::q8_0: return 7;
    case io::GGUFTensorType::bf16: return 32;
  }
  return 0;
}

}  // namespace

GGUFVocab read_gguf_vocab(const std::string& dir, int64_t vocab_size) {
  const fs::path tok_path = fs::path(dir) / "tokenizer.json";
  KILN_CHECK(fs::exists(tok_path), "gguf", "{}: no tokenizer.json", dir);
  const json tok = parse_json_file(tok_path);
  GGUFVocab v;
  std::map<int64_t, std::pair<std::string, int32_t>> by_id;  // id -> (token, type)
  const std::string token_id_what = tok_path.string() + ": a token id";
  const auto token_id = [&](const json& id) { return need_json_int(id, "gguf", token_id_what); };
  try {
    const json& model = tok.at("model");
    KILN_CHECK(model.value("type", std::string()) == "BPE", "gguf", "{}: only byte-level BPE tokenizers are exported, found {}",
               tok_path.string(), model.value("type", std::string("?")));
    for (auto& [token, id] : model.at("vocab").items()) by_id[token_id(id)] = {token, kNormal};
    for (const json& m : model.at("merges")) {
      if (m.is_string()) v.merges.push_back(m.get<std::string>());  // "left right" (older files)
      else v.merges.push_back(m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
    }
    if (tok.contains("added_tokens"))
      for (const json& a : tok["added_tokens"])
        by_id[token_id(a.at("id"))] = {a.at("content").get<std::string>(), a.value("special", false) ? kControl : kUserDefined};
  } catch (const json::exception& e) {
    KILN_FAIL("gguf", "{}: {}", tok_path.string(), e.what());
  }
  KILN_CHECK(!by_id.empty() && by_id.begin()->first >= 0, "gguf", "{}: no tokens, or a negative id", tok_path.string());
  KILN_CHECK(by_id.rbegin()->first < vocab_size, "gguf", "{}: token id {} is past the model's vocabulary of {}",
             tok_path.string(), by_id.rbegin()->first, vocab_size);
  for (int64_t id = 0; id < vocab_size; ++id) {
    auto it = by_id.find(id);
    if (it == by_id.end()) v.tokens.push_back("[PAD" + std::to_string(id) + "]"), v.token_types.push_back(kUnused);
    else v.tokens.push_back(it->second.first), v.token_types.push_back(it->second.second);
  }
  auto id_of = [&](const std::string& content) -> int64_t {
    for (size_t i = 0; i < v.tokens.size(); ++i)
      if (v.tokens[i] == content && v.token_types[i] != kUnused) return static_cast<int64_t>(i);
    return -1;
  };
  const fs::path cfg_path = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(cfg_path)) {
    const json cfg = parse_json_file(cfg_path);
    if (cfg.contains("bos_token")) v.bos_id = id_of(token_content(cfg["bos_token"]));
    if (cfg.contains("eos_token")) v.eos_id = id_of(token_content(cfg["eos_token"]));
    if (cfg.contains("pad_token")) v.pad_id = id_of(token_content(cfg["pad_token"]));
    if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean()) v.add_bos = cfg["add_bos_token"].get<bool>();
    if (cfg.contains("chat_template") && cfg["chat_template"].is_string()) v.chat_template = cfg["chat_template"];
  }
  if (v.bos_id < 0) v.bos_id = id_of("<|begin_of_text|>");
  if (v.eos_id < 0) v.eos_id = id_of("<|end_of_text|>");
  return v;
}

std::string gguf_tensor_name(const std::string& key) {
  static const std::map<std::string, std::string> top = {{"model.embed_tokens.weight", "token_embd.weight"},
                                                         {"model.norm.weight", "output_norm.weight"},
                                                         {"lm_head.weight", "output.weight"}};
  if (auto it = top.find(key); it != top.end()) return it->second;
  static const std::map<std::string, std::string> block = {
      {"self_attn.q_proj", "attn_q"},       {"self_attn.k_proj", "attn_k"},  {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"},  {"mlp.gate_proj", "ffn_gate"},   {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"},        {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"}};
  static const std::regex layer(R"(model\.layers\.(\d+)\.(.+)\.(weight|bias))");
  std::smatch m;
  if (std::regex_match(key, m, layer))
    if (auto it = block.find(m[2].str()); it != block.end()) return "blk." + m[1].str() + "." + it->second + "." + m[3].str();
  KILN_FAIL("gguf", "tensor '{}' is not part of a Llama (no llama.cpp name for it)", key);
}

Tensor gguf_permute_qk(const Tensor& w, int64_t heads) {
  KILN_CHECK(w.dim() >= 1 && heads > 0 && w.size(0) % (2 * heads) == 0, "gguf",
             "cannot permute {} rows for {} heads (rows must be heads * even head_dim)", w.dim() ? w.size(0) : 0, heads);
  Shape split{heads, 2, w.size(0) / heads / 2};  // (heads, pair j, half i, ...)
  for (int64_t d = 1; d < w.dim(); ++d) split.push_back(w.size(d));
  return contiguous(reshape(transpose(reshape(w, split), 1, 2), w.shape()));  // (heads, i, j, ...) -> rows
}

Tensor llama3_rope_factors(const LlamaConfig& c) {
  KILN_CHECK(c.rope_scaling.has_value(), "gguf", "rope factors need a llama3 rope_scaling");
  const RopeScaling& s = *c.rope_scaling;
  const double low_wavelen = static_cast<double>(s.original_max_position_embeddings) / s.low_freq_factor;
  const double high_wavelen = static_cast<double>(s.original_max_position_embeddings) / s.high_freq_factor;
  std::vector<float> factors;  // (head_dim / 2)
  for (int64_t i = 0; i < c.head_dim; i += 2) {
    // As convert_hf_to_gguf computes it: frequencies in f32, then the llama3 rule per frequency.
    const float freq = 1.0f / std::pow(static_cast<float>(c.rope_theta), static_cast<float>(i) / static_cast<float>(c.head_dim));
    const double wavelen = 2.0 * std::numbers::pi / freq;
    if (wavelen < high_wavelen) factors.push_back(1.0f);
    else if (wavelen > low_wavelen) factors.push_back(static_cast<float>(s.factor));
    else {
      const double smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      factors.push_back(static_cast<float>(1.0 / ((1.0 - smooth) / s.factor + smooth)));
    }
  }
  return from_vector(factors, {static_cast<int64_t>(factors.size())});
}

io::GGUFMetadata llama_gguf_metadata(const LlamaConfig& c, const GGUFVocab& vocab, io::GGUFTensorType type,
                                     const std::string& name) {
  KILN_CHECK(static_cast<int64_t>(vocab.tokens.size()) == c.vocab_size, "gguf",
             "the vocabulary has {} tokens, the model {} ids", vocab.tokens.size(), c.vocab_size);
  auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  io::GGUFMetadata md = {
      {"general.architecture", std::string("llama")},
      {"general.type", std::string("model")},
      {"general.name", name},
      {"general.file_type", file_type(type)},
      {"general.quantization_version", uint32_t{2}},
      {"llama.vocab_size", u32(c.vocab_size)},
      {"llama.context_length", u32(c.max_position_embeddings)},
      {"llama.embedding_length", u32(c.hidden_size)},
      {"llama.block_count", u32(c.num_hidden_layers)},
      {"llama.feed_forward_length", u32(c.intermediate_size)},
      {"llama.attention.head_count", u32(c.num_attention_heads)},
      {"llama.attention.head_count_kv", u32(c.num_key_value_heads)},
      {"llama.rope.freq_base", static_cast<float>(c.rope_theta)},
      {"llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps)},
      {"llama.attention.key_length", u32(c.head_dim)},
      {"llama.attention.value_length", u32(c.head_dim)},
      {"llama.rope.dimension_count", u32(c.head_dim)},
      {"tokenizer.ggml.model", std::string("gpt2")},
      {"tokenizer.ggml.pre", vocab.pre},
      {"tokenizer.ggml.tokens", vocab.tokens},
      {"tokenizer.ggml.token_type", vocab.token_types},
      {"tokenizer.ggml.merges", vocab.merges},
  };
  if (vocab.bos_id >= 0) md.emplace_back("tokenizer.ggml.bos_token_id", u32(vocab.bos_id));
  if (vocab.eos_id >= 0) md.emplace_back("tokenizer.ggml.eos_token_id", u32(vocab.eos_id));
  if (vocab.pad_id >= 0) md.emplace_back("tokenizer.ggml.padding_token_id", u32(vocab.pad_id));
  md.emplace_back("tokenizer.ggml.add_bos_token", vocab.add_bos);
  if (!vocab.chat_template.empty()) md.emplace_back("tokenizer.chat_template", vocab.chat_template);
  return md;
}

namespace {

// How a tensor of `shape` is stored when matrices are asked to be `type`: 1-d tensors f32; Q8_0 falls back to
// f16 for rows that are not a multiple of its 32-value blocks (as convert_hf_to_gguf does).
io::GGUFTensorType stored_type(const Shape& shape, io::GGUFTensorType type) {
  if (shape.size() < 2) return io::GGUFTensorType::f32;
  if (type == io::GGUFTensorType::q8_0 && shape.back() % 32 != 0) return io::GGUFTensorType::f16;
  return type;
}

// The heads whose rows gguf_permute_qk reorders for the tensor `key` names (its rows are q's or k's
// outputs); 0 for any other tensor.
int64_t qk_permute_heads(const std::string& key, const LlamaConfig& c) {
  for (const char* t : {".weight", ".bias", ".lora_B.weight"}) {
    if (key.ends_with(std::string("self_attn.q_proj") + t)) return c.num_attention_heads;
    if (key.ends_with(std::string("self_attn.k_proj") + t)) return c.num_key_value_heads;
  }
  return 0;
}

}  // namespace

void write_llama_gguf(const std::string& path, Llama& model, const GGUFVocab& vocab, io::GGUFTensorType type,
                      const std::string& name) {
  const LlamaConfig& c = model.config();
  const std::vector<PlainTensor> plain = plain_tensors(model);
  std::vector<io::GGUFTensorInfo> infos;
  std::vector<std::function<Tensor()>> sources;  // tensor i, computed when written
  for (const PlainTensor& p : plain) {
    if (c.tie_word_embeddings && p.key == "lm_head.weight") continue;
    const io::GGUFTensorInfo info{gguf_tensor_name(p.key), p.shape, stored_type(p.shape, type)};
    const int64_t permute_heads = qk_permute_heads(p.key, c);
    infos.push_back(info);
    sources.push_back([get = p.get, permute_heads] {
      const Tensor t = get(DType::f32);  // merged in f32 (rounded once by the writer into the stored type)
      return permute_heads ? gguf_permute_qk(t, permute_heads) : t;
    });
  }
  if (c.rope_scaling) {  // llama.cpp applies llama3 scaling through these factors
    infos.push_back({"rope_freqs.weight", Shape{c.head_dim / 2}, io::GGUFTensorType::f32});
    sources.push_back([&c] { return llama3_rope_factors(c); });
  }
  autograd::NoGradGuard no_grad;
  io::write_gguf(path, llama_gguf_metadata(c, vocab, type, name), infos, [&](size_t i) { return sources[i](); });
}

void write_llama_lora_gguf(const std::string& path, Llama& model, io::GGUFTensorType type, const std::string& name) {
  const LlamaConfig& c = model.config();
  const std::vector<std::pair<std::string, LoraLinear*>> layers = lora_layers(model);
  KILN_CHECK(!layers.empty(), "gguf", "the model has no LoRA layers to write");
  // llama.cpp scales every layer by alpha / rank with one alpha per file: kiln's scaling * r must agree.
  const double alpha = layers[0].second->scaling() * static_cast<double>(layers[0].second->lora_a().size(0));
  std::vector<io::GGUFTensorInfo> infos;
  std::vector<std::function<Tensor()>> sources;  // tensor i, computed when written
  for (const auto& [module_path, l] : layers) {
    KILN_CHECK(!l->merged(), "gguf", "{}: the adapter is merged into its base; a LoRA file needs it apart", module_path);
    const double a = l->scaling() * static_cast<double>(l->lora_a().size(0));
    KILN_CHECK(std::abs(a - alpha) <= 1e-6 * std::abs(alpha), "gguf",
               "{}: scaling * rank is {}, another layer's {}: llama.cpp's LoRA files hold one alpha for all layers",
               module_path, a, alpha);
    const std::string base = gguf_tensor_name(module_path + ".weight");
    KILN_CHECK(!(c.tie_word_embeddings && base == "output.weight"), "gguf",
               "{}: the lm_head is tied to the embeddings, which llama.cpp keeps as one tensor: no LoRA file for it", module_path);
    const int64_t permute_heads = qk_permute_heads(module_path + ".lora_B.weight", c);
    // A (r, in) and B (out, r) as PEFT stores them are the shapes llama.cpp takes (ggml: ne = {in, r}, {r, out});
    // B's rows are the base's output rows, so q's and k's are permuted as their weights are.
    for (const auto& part : {std::tuple{".lora_a", l->lora_a(), int64_t{0}}, {".lora_b", l->lora_b(), permute_heads}}) {
      const Tensor t = std::get<1>(part);  // a named copy: clang 14 cannot capture a structured binding
      const int64_t heads = std::get<2>(part);
      infos.push_back({base + std::get<0>(part), t.shape(), stored_type(t.shape(), type)});
      sources.push_back([t, heads] {
        const Tensor v = cast(t, DType::f32);
        return heads ? gguf_permute_qk(v, heads) : contiguous(v);
      });
    }
  }
  const io::GGUFMetadata md = {{"general.architecture", std::string("llama")},
                               {"general.type", std::string("adapter")},
                               {"general.name", name},
                               {"adapter.type", std::string("lora")},
                               {"adapter.lora.alpha", static_cast<float>(alpha)}};
  autograd::NoGradGuard no_grad;
  io::write_gguf(path, md, infos, [&](size_t i) { return sources[i](); });
}

}  // namespace kiln::nn

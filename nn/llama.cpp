// Llama's modules (attention, MLP, decoder layer, model, causal-LM head), their forward passes,
// and loading a Hugging Face folder layer by layer.
#include "nn/llama.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "autograd/checkpoint.h"
#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "core/ops/attention.h"
#include "nn/chunked_loss.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "quant/bnb_checkpoint.h"
#include "io/safetensors.h"

namespace kiln::nn {

namespace {

Init llama_init(const LlamaConfig& c, const LlamaOptions& o, Generator* gen, bool loading) {
  Init init;
  init.kind = loading ? Init::Kind::uninitialized : o.random_init ? Init::Kind::normal : Init::Kind::zeros;
  init.std = c.initializer_range;  // HF: normal(0, initializer_range)
  init.gen = gen;
  return init;
}

std::shared_ptr<Linear> make_linear(int64_t in, int64_t out, bool bias, DType dtype, Device device, const Init& init) {
  return std::make_shared<Linear>(in, out, bias, dtype, device, init);
}

}  // namespace

// ---- attention

LlamaAttention::LlamaAttention(const LlamaConfig& c, DType dtype, Device device, const Init& init,
                               std::shared_ptr<RotaryEmbedding> rope)
    : heads_(c.num_attention_heads), kv_heads_(c.num_key_value_heads), head_dim_(c.head_dim), rope_(std::move(rope)) {
  const int64_t h = c.hidden_size;
  register_module("q_proj", make_linear(h, heads_ * head_dim_, c.attention_bias, dtype, device, init));
  register_module("k_proj", make_linear(h, kv_heads_ * head_dim_, c.attention_bias, dtype, device, init));
  register_module("v_proj", make_linear(h, kv_heads_ * head_dim_, c.attention_bias, dtype, device, init));
  register_module("o_proj", make_linear(heads_ * head_dim_, h, c.attention_bias, dtype, device, init));
}

Tensor LlamaAttention::forward(const Tensor& x, int64_t start, KVCache::Layer* cache, const Tensor& residual) {
  KILN_CHECK(x.dim() == 3, "LlamaAttention", "expected x (B, T, hidden), found {}", shape_str(x.shape()));
  const int64_t b = x.size(0), t = x.size(1);
  // Heads stay after the positions throughout (heads_last attention): the projections' outputs are
  // viewed as heads and the attention output as (B, T, Hq*D), with no layout copy either way.
  // q, k and v share x's LoRA GEMMs where they can (shared_input_forward)
  const std::vector<Tensor> qkv = shared_input_forward(
      {&child_as<LinearBase>("q_proj"), &child_as<LinearBase>("k_proj"), &child_as<LinearBase>("v_proj")}, x);
  auto heads = [&](const Tensor& y, int64_t n) { return view(y, {b, t, n, head_dim_}); };  // (B, T, n*D) -> (B, T, n, D)
  Tensor q = rope_->apply_heads_last(heads(qkv[0], heads_), start);     // (B, T, Hq, D)
  Tensor k = rope_->apply_heads_last(heads(qkv[1], kv_heads_), start);  // (B, T, Hkv, D)
  Tensor v = heads(qkv[2], kv_heads_);                                  // (B, T, Hkv, D)
  if (cache) {  // the cache is (B, Hkv, positions, D)
    KILN_CHECK(start + t <= cache->k.size(2), "LlamaAttention", "the KV cache holds {} positions, asked for {}",
               cache->k.size(2), start + t);
    autograd::NoGradGuard no_grad;
    copy_(narrow(cache->k, 2, start, t), transpose(k, 1, 2));
    copy_(narrow(cache->v, 2, start, t), transpose(v, 1, 2));
    k = transpose(narrow(cache->k, 2, 0, start + t), 1, 2);  // (B, start+T, Hkv, D)
    v = transpose(narrow(cache->v, 2, 0, start + t), 1, 2);
  }
  for (const Tensor* kept : {&q, &k, &v}) autograd::keep_for_recompute(*kept);  // an offloaded layer keeps them
  Tensor o = scaled_dot_product_attention_heads_last(q, k, v, /*causal=*/true);  // (B, T, Hq, D)
  o = view(o, {b, t, heads_ * head_dim_});                                         // (B, T, Hq*D)
  auto& o_proj = child_as<LinearBase>("o_proj");
  return residual.defined() ? o_proj.residual_add(residual, o) : o_proj(o);
}

// ---- MLP

LlamaMLP::LlamaMLP(const LlamaConfig& c, DType dtype, Device device, const Init& init) {
  register_module("gate_proj", make_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, device, init));
  register_module("up_proj", make_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtype, device, init));
  register_module("down_proj", make_linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtype, device, init));
}

Tensor LlamaMLP::run(const Tensor& x, const Tensor& residual) {
  // gate and up share x's LoRA GEMMs where they can (shared_input_forward)
  const std::vector<Tensor> gu = shared_input_forward({&child_as<LinearBase>("gate_proj"), &child_as<LinearBase>("up_proj")}, x);
  auto& down = child_as<LinearBase>("down_proj");
  const Tensor s = swiglu(gu[0], gu[1]);  // (B, T, I)
  return residual.defined() ? down.residual_add(residual, s) : down(s);
}

void LlamaMLP::set_sequence_chunk(int64_t tokens) {
  KILN_CHECK(tokens >= 0, "Llama", "the MLP's sequence chunk must be 0 (off) or positive, found {}", tokens);
  chunk_ = tokens;
}

Tensor LlamaMLP::forward(const Tensor& x, const Tensor& residual) {
  if (chunk_ == 0 || x.dim() < 2 || x.size(-2) <= chunk_) return run(x, residual);
  Tensor y = autograd::checkpoint_chunks([this](const Tensor& piece) { return run(piece, Tensor()); }, x, -2, chunk_);
  return residual.defined() ? add(residual, y) : y;
}

// ---- decoder layer

LlamaDecoderLayer::LlamaDecoderLayer(const LlamaConfig& c, DType dtype, Device device, const Init& init,
                                     std::shared_ptr<RotaryEmbedding> rope) {
  register_module("self_attn", std::make_shared<LlamaAttention>(c, dtype, device, init, std::move(rope)));
  register_module("mlp", std::make_shared<LlamaMLP>(c, dtype, device, init));
  register_module("input_layernorm", std::make_shared<RMSNorm>(c.hidden_size, c.rms_norm_eps, dtype, device));
  register_module("post_attention_layernorm", std::make_shared<RMSNorm>(c.hidden_size, c.rms_norm_eps, dtype, device));
}

Tensor LlamaDecoderLayer::forward(const Tensor& x, int64_t start, KVCache::Layer* cache) {
  // Each residual add runs in the block's last GEMM (o_proj, down_proj), unless hooks watch the block.
  auto& attn = child_as<LlamaAttention>("self_attn");
  const Tensor n1 = child_as<RMSNorm>("input_layernorm")(x);  // (B, T, hidden)
  const Tensor h = attn.has_forward_hooks() ? add(x, attn(n1, start, cache)) : attn.forward(n1, start, cache, x);
  autograd::keep_for_recompute(h);  // (an offloaded layer's recompute then skips o_proj)
  auto mlp_block = [this](const Tensor& v) {  // (B, T', hidden) -> (B, T', hidden)
    auto& mlp = child_as<LlamaMLP>("mlp");
    const Tensor n2 = child_as<RMSNorm>("post_attention_layernorm")(v);
    return mlp.has_forward_hooks() ? add(v, mlp(n2)) : mlp.forward(n2, v);
  };
  const int64_t chunk = child_as<LlamaMLP>("mlp").sequence_chunk();
  if (chunk > 0 && h.size(1) > chunk) return autograd::checkpoint_chunks(mlp_block, h, 1, chunk);
  return mlp_block(h);
}

// ---- model

LlamaModel::LlamaModel(const LlamaConfig& c, const LlamaOptions& o, const WeightSource* source) {
  Generator gen(o.seed);
  const Init init = llama_init(c, o, &gen, source != nullptr);
  std::set<std::string> source_keys;
  if (source) source_keys.insert(source->keys.begin(), source->keys.end());
  auto fill = [&](Module& m, const std::string& prefix) {
    if (!source) return;
    // Linear layers stored as bitsandbytes NF4 (a bnb-4bit checkpoint) become NF4Linear, bit for bit.
    std::set<std::string> quantised;  // module paths under `m` loaded from bnb tensors (with a '.')
    struct Target {
      Module* parent;
      std::string name, sub;
      bool bias;
    };
    std::vector<Target> targets;  // found first, replaced after (replacing frees the old Linear)
    for (auto& [path, mod] : m.named_modules())
      for (auto& [name, child] : mod->named_children()) {
        const std::string sub = path.empty() ? name : path + "." + name;
        if (dynamic_cast<Linear*>(child.get()) && source_keys.count(prefix + sub + ".weight.quant_state.bitsandbytes__nf4"))
          targets.push_back({mod, name, sub, child->has_parameter("bias")});
      }
    for (const auto& [parent, name, sub, has_bias] : targets) {
      const std::string key = prefix + sub + ".weight";
      NamedTensors parts;  // weight, weight.absmax, weight.nested_absmax, ..., weight.quant_state.bitsandbytes__nf4
      for (auto it = source_keys.lower_bound(key); it != source_keys.end() && it->starts_with(key); ++it)
        parts.emplace_back(*it, source->get(*it));
      quant::NF4Weight w = quant::to_device(quant::read_bnb_nf4(parts, key), o.device);
      Tensor bias;
      if (has_bias) bias = to_device(cast(source->get(prefix + sub + ".bias"), o.dtype), o.device);
      parent->replace_module(name, std::make_shared<NF4Linear>(std::move(w), bias));
      quantised.insert(sub + ".");
    }
    StateDict state;
    for (auto& [name, t] : m.state_dict()) {
      const std::string& key = name;  // clang 14 cannot capture a structured binding in a lambda
      if (std::any_of(quantised.begin(), quantised.end(), [&](const std::string& q) { return key.starts_with(q); })) continue;
      Tensor v = source->get(prefix + name);
      KILN_CHECK(v.shape() == t.shape(), "load", "{}: tensor '{}' has shape {}, expected {}", source->origin,
                 prefix + name, shape_str(v.shape()), shape_str(t.shape()));
      state.emplace(name, v);
    }
    m.load_state_dict(state, /*strict=*/quantised.empty());
  };
  auto embed = register_module("embed_tokens", std::make_shared<Embedding>(c.vocab_size, c.hidden_size, o.dtype, o.device, init));
  fill(*embed, "model.embed_tokens.");
  auto rope = std::make_shared<RotaryEmbedding>(c.head_dim, c.rope_theta, c.rope_scaling);
  auto layers = register_module("layers", std::make_shared<ModuleList>());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    auto layer = layers->push_back(std::make_shared<LlamaDecoderLayer>(c, o.dtype, o.device, init, rope));
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    fill(*layer, prefix);
    if (o.on_layer_built) o.on_layer_built(prefix, *layer);
  }
  auto norm = register_module("norm", std::make_shared<RMSNorm>(c.hidden_size, c.rms_norm_eps, o.dtype, o.device));
  fill(*norm, "model.norm.");
}

void check_segments(const std::vector<LayerActivations>& per_layer) {
  for (size_t i = 0; i < per_layer.size(); ++i)
    KILN_CHECK(per_layer[i] != LayerActivations::segment || (i > 0 && per_layer[i - 1] != LayerActivations::keep), "Llama",
               "decoder layer {} is marked segment but {}: a segment starts at a checkpointed or offloaded layer", i,
               i == 0 ? "is the first layer" : fmt::format("layer {} below it is kept whole", i - 1));
}

std::vector<LayerActivations> in_segments(int64_t layers, int64_t g, int64_t offloaded) {
  KILN_CHECK(g >= 2, "Llama", "a segment spans at least 2 layers, found {}", g);
  std::vector<LayerActivations> out(static_cast<size_t>(std::max<int64_t>(layers, 0)));
  for (int64_t i = 0; i < layers; ++i)
    out[static_cast<size_t>(i)] = i % g != 0         ? LayerActivations::segment
                                  : i / g < offloaded ? LayerActivations::offload
                                                      : LayerActivations::checkpoint;
  return out;
}

const char* layer_activations_name(LayerActivations a) {
  switch (a) {
    case LayerActivations::keep: return "keep";
    case LayerActivations::checkpoint: return "checkpoint";
    case LayerActivations::offload: return "offload";
    case LayerActivations::offload_qkv: return "qkv-offload";
    case LayerActivations::segment: return "segment";
  }
  return "?";
}

Tensor LlamaModel::forward(const Tensor& ids, int64_t start, KVCache* cache,
                           const std::vector<LayerActivations>& activations) {
  KILN_CHECK(ids.dim() == 2 && !is_floating(ids.dtype()), "Llama", "expected integer ids (B, T), found {} {}",
             dtype_name(ids.dtype()), shape_str(ids.shape()));
  Tensor x = child_as<Embedding>("embed_tokens")(ids);  // (B, T, hidden)
  auto& layers = child_as<ModuleList>("layers");
  KILN_CHECK(!cache || static_cast<int64_t>(cache->layers.size()) == layers.size(), "Llama",
             "the KV cache has {} layers, the model {}", cache ? cache->layers.size() : 0, layers.size());
  KILN_CHECK(activations.empty() || static_cast<int64_t>(activations.size()) == layers.size(), "Llama",
             "expected an activations choice per decoder layer ({}), found {}", layers.size(), activations.size());
  check_segments(activations);
  auto choice = [&](int64_t i) { return activations.empty() ? LayerActivations::keep : activations[static_cast<size_t>(i)]; };
  auto checkpointed = [start](LlamaDecoderLayer& layer, const Tensor& in, const autograd::CheckpointOptions& co) {
    return autograd::checkpoint([&layer, start](const std::vector<Tensor>& x) { return std::vector<Tensor>{layer(x[0], start)}; },
                                {in}, co)[0];
  };
  for (int64_t i = 0; i < layers.size(); ++i) {
    auto& layer = layers.at<LlamaDecoderLayer>(i);
    KVCache::Layer* lc = cache ? &cache->layers[static_cast<size_t>(i)] : nullptr;
    const LayerActivations a = choice(i);
    if (a == LayerActivations::keep || !autograd::grad_enabled() || cache) {
      x = layer(x, start, lc);
      continue;
    }
    int64_t last = i;  // the segment i starts: i .. last
    while (last + 1 < layers.size() && choice(last + 1) == LayerActivations::segment) ++last;
    autograd::CheckpointOptions co;
    co.offload = is_offloaded(a);
    if (last > i) {  // the segment's input only (on the host when offloaded); its layers checkpointed inside
      x = autograd::checkpoint(
          [&layers, checkpointed, i, last](const std::vector<Tensor>& in) {
            Tensor h = in[0];
            for (int64_t l = i; l <= last; ++l) h = checkpointed(layers.at<LlamaDecoderLayer>(l), h, {});
            return std::vector<Tensor>{h};
          },
          {x}, co)[0];
      i = last;
      continue;
    }
    if (co.offload) {  // the attention output and LSE wait on the host too
      co.save = [](const Primitive& op) { return dynamic_cast<const prim::ScaledDotProductAttention*>(&op) != nullptr; };
      // q, k, v and the residual stream after attention too: the recompute skips their GEMMs
      co.keep_marked = a == LayerActivations::offload_qkv;
    }
    x = checkpointed(layer, x, co);
  }
  if (cache) cache->length = start + ids.size(1);
  return child_as<RMSNorm>("norm")(x);
}

namespace {
std::string call_key(int64_t start, const void* cache) { return fmt::format("start={} cache={}", start, cache ? "yes" : "none"); }
// "" (every layer kept), " checkpoint" / " offload" (every layer so) or " activations=kcco" (per layer).
std::string activations_key(const std::vector<LayerActivations>& activations) {
  auto all = [&](LayerActivations a) { return std::all_of(activations.begin(), activations.end(), [a](auto x) { return x == a; }); };
  if (all(LayerActivations::keep)) return "";
  if (all(LayerActivations::checkpoint)) return " checkpoint";
  if (all(LayerActivations::offload)) return " offload";
  std::string key = " activations=";
  for (LayerActivations a : activations) key += layer_activations_name(a)[0];
  return key;
}
}  // namespace

Tensor LlamaAttention::operator()(const Tensor& x, int64_t start, KVCache::Layer* cache) {
  if (!has_forward_hooks()) return forward(x, start, cache);
  return call_forward({x}, call_key(start, cache), [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{forward(in.at(0), start, cache)};
  }).at(0);
}

Tensor LlamaDecoderLayer::operator()(const Tensor& x, int64_t start, KVCache::Layer* cache) {
  if (!has_forward_hooks()) return forward(x, start, cache);
  return call_forward({x}, call_key(start, cache), [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{forward(in.at(0), start, cache)};
  }).at(0);
}

Tensor LlamaModel::operator()(const Tensor& ids, int64_t start, KVCache* cache,
                              const std::vector<LayerActivations>& activations) {
  if (!has_forward_hooks()) return forward(ids, start, cache, activations);
  return call_forward({ids}, call_key(start, cache) + activations_key(activations), [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{forward(in.at(0), start, cache, activations)};
  }).at(0);
}

// ---- causal LM

Llama::Llama(const LlamaConfig& config, const LlamaOptions& options, const WeightSource* source)
    : config_(config), options_(options) {
  config_.validate();
  set_checkpoint_activations(options.checkpoint_activations);
  register_module("model", std::make_shared<LlamaModel>(config_, options_, source));
  if (!config_.tie_word_embeddings) {
    Generator gen(options.seed + 1);
    auto head = register_module("lm_head", std::make_shared<Linear>(config_.hidden_size, config_.vocab_size, false,
                                                                     options.dtype, options.device, llama_init(config_, options, &gen, source != nullptr)));
    if (source) {
      Tensor v = source->get("lm_head.weight");
      KILN_CHECK(v.shape() == head->weight().shape(), "load", "{}: tensor 'lm_head.weight' has shape {}, expected {}",
                 source->origin, shape_str(v.shape()), shape_str(head->weight().shape()));
      head->load_state_dict({{"weight", v}});
    }
  }
}

void Llama::set_checkpoint_activations(bool on) {
  activations_.assign(static_cast<size_t>(config_.num_hidden_layers), on ? LayerActivations::checkpoint : LayerActivations::keep);
}

void Llama::set_layer_activations(std::vector<LayerActivations> per_layer) {
  KILN_CHECK(static_cast<int64_t>(per_layer.size()) == config_.num_hidden_layers, "Llama",
             "set_layer_activations expected one entry per decoder layer ({}), found {}", config_.num_hidden_layers,
             per_layer.size());
  check_segments(per_layer);
  activations_ = std::move(per_layer);
}

void Llama::set_mlp_chunk(int64_t tokens) {
  auto& layers = model().child_as<ModuleList>("layers");
  for (int64_t i = 0; i < layers.size(); ++i) layers.at<LlamaDecoderLayer>(i).child_as<LlamaMLP>("mlp").set_sequence_chunk(tokens);
}

int64_t Llama::mlp_chunk() const {
  return model().child_as<ModuleList>("layers").at<LlamaDecoderLayer>(0).child_as<LlamaMLP>("mlp").sequence_chunk();
}

namespace {
// The NF4 layers of decoder layer `layer` (inside LoRA wrappers too).
std::vector<NF4Linear*> nf4_layers(Module& layer) {
  std::vector<NF4Linear*> out;
  for (auto& [path, m] : layer.named_modules())
    if (auto* q = dynamic_cast<NF4Linear*>(m)) out.push_back(q);
  return out;
}
}  // namespace

void Llama::set_dequantized_layers(int64_t n) {
  auto& layers = model().child_as<ModuleList>("layers");
  KILN_CHECK(n >= 0 && n <= layers.size(), "Llama", "dequantized layers must be 0 to {}, found {}", layers.size(), n);
  for (int64_t i = 0; i < layers.size(); ++i)
    for (NF4Linear* q : nf4_layers(layers.at<LlamaDecoderLayer>(i))) q->keep_dequantized(i < n);
}

int64_t Llama::dequantized_layers() const {
  auto& layers = model().child_as<ModuleList>("layers");
  int64_t n = 0;
  while (n < layers.size()) {
    const std::vector<NF4Linear*> q = nf4_layers(layers.at<LlamaDecoderLayer>(n));
    if (q.empty() || !q.front()->keeps_dequantized()) break;
    ++n;
  }
  return n;
}

size_t Llama::dequantized_layer_bytes() const {
  auto& layer = model().child_as<ModuleList>("layers").at<LlamaDecoderLayer>(0);
  size_t elements = 0;
  for (NF4Linear* q : nf4_layers(layer)) elements += static_cast<size_t>(q->weight().numel());
  return elements * itemsize(lm_head_weight().dtype());
}

void Llama::set_loss_memory_budget(size_t bytes) {
  KILN_CHECK(bytes > 0, "Llama", "the loss head's memory budget must be positive, found 0 bytes");
  loss_memory_budget_ = bytes;
}

Tensor Llama::forward(const Tensor& ids, int64_t start, KVCache* cache) {
  return model()(ids, start, cache, is_training() ? activations_ : std::vector<LayerActivations>{});
}

Tensor Llama::operator()(const Tensor& ids, int64_t start, KVCache* cache) {
  if (!has_forward_hooks()) return forward(ids, start, cache);
  return call_forward({ids}, call_key(start, cache), [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{forward(in.at(0), start, cache)};
  }).at(0);
}

Tensor Llama::lm_head_weight() const {
  if (config_.tie_word_embeddings) return model().child_as<Embedding>("embed_tokens").weight();
  return child_as<LinearBase>("lm_head").parameter("weight");
}

Tensor Llama::logits(const Tensor& hidden) {
  if (config_.tie_word_embeddings) return matmul(hidden, transpose(lm_head_weight(), 0, 1));
  return child_as<LinearBase>("lm_head")(hidden);
}

Tensor Llama::loss(const Tensor& hidden, const Tensor& targets, Reduction reduction) {
  KILN_CHECK(reduction != Reduction::none, "Llama", "loss reduces to a sum or a mean (use logits() for per-token values)");
  Tensor logits2d = reshape(logits(hidden), {-1, config_.vocab_size});  // (B*T, V)
  return cross_entropy(cast(logits2d, DType::f32), reshape(targets, {-1}), -100, reduction);
}

Tensor Llama::chunked_loss(const Tensor& hidden, const Tensor& targets, Reduction reduction, bool overwrite_hidden) {
  KILN_CHECK(reduction != Reduction::none, "Llama", "chunked_loss reduces to a sum or a mean");
  KILN_CHECK(config_.tie_word_embeddings || dynamic_cast<Linear*>(&child_as<LinearBase>("lm_head")), "Llama",
             "the chunked loss head needs a plain lm_head, found {}", child_as<LinearBase>("lm_head").type_name());
  ChunkedLossOptions o;
  o.reduction = reduction;
  o.memory_budget_bytes = loss_memory_budget_;
  o.overwrite_hidden = overwrite_hidden;
  return chunked_linear_loss(hidden, lm_head_weight(), targets, cross_entropy_loss(), o);
}

KVCache Llama::make_cache(int64_t batch, int64_t capacity) const {
  KILN_CHECK(batch > 0 && capacity > 0, "Llama", "a KV cache needs batch > 0 and capacity > 0, found {} and {}", batch, capacity);
  KVCache cache;
  cache.capacity = capacity;
  const DType dt = model().child_as<Embedding>("embed_tokens").weight().dtype();
  const Device dev = model().child_as<Embedding>("embed_tokens").weight().device();
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i)
    cache.layers.push_back({zeros({batch, config_.num_key_value_heads, capacity, config_.head_dim}, dt, dev),
                            zeros({batch, config_.num_key_value_heads, capacity, config_.head_dim}, dt, dev)});
  return cache;
}

// ---- Hugging Face folders

WeightSource open_hf_weights(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  WeightSource src;
  src.origin = dir;
  if (fs::exists(index)) {
    auto ckpt = std::make_shared<io::ShardedCheckpoint>(io::ShardedCheckpoint::open(dir));
    src.keys = ckpt->keys();
    src.get = [ckpt, dir](const std::string& key) {
      KILN_CHECK(ckpt->contains(key), "load", "{}: the checkpoint has no tensor '{}'", dir, key);
      return ckpt->get(key);
    };
    return src;
  }
  KILN_CHECK(fs::exists(single), "load", "{} has neither model.safetensors nor model.safetensors.index.json", dir);
  auto file = std::make_shared<io::SafetensorsFile>(io::SafetensorsFile::open(single.string()));
  src.keys = file->keys();
  src.get = [file](const std::string& key) {
    KILN_CHECK(file->contains(key), "load", "{}: the checkpoint has no tensor '{}'", file->path(), key);
    return file->get(key);
  };
  return src;
}

std::shared_ptr<Llama> Llama::from_pretrained(const std::string& dir, LlamaOptions options) {
  const LlamaConfig config = LlamaConfig::from_file((std::filesystem::path(dir) / "config.json").string());
  const WeightSource source = open_hf_weights(dir);
  // Every key must be used: an unexpected one means the folder is not the model the config says.
  std::set<std::string> expected;
  for (const std::string& k : source.keys) {
    const bool ignorable = k.ends_with(".rotary_emb.inv_freq") || (config.tie_word_embeddings && k == "lm_head.weight");
    if (!ignorable) expected.insert(k);
  }
  std::set<std::string> used;
  WeightSource tracked = source;
  tracked.get = [&](const std::string& key) {
    used.insert(key);
    return source.get(key);
  };
  options.random_init = false;
  auto model = std::make_shared<Llama>(config, options, &tracked);
  for (const std::string& k : expected)
    KILN_CHECK(used.count(k), "load", "{}: unexpected tensor '{}' (not part of a Llama with this config.json)", dir, k);
  return model;
}

}  // namespace kiln::nn

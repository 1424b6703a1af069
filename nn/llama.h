// Llama (2/3/3.1 architecture) as Hugging Face's LlamaForCausalLM lays it out, so parameter
// names equal the keys of a HF checkpoint: grouped-query causal attention with rotary embeddings
// (llama3 scaling), SwiGLU MLP, RMSNorm, tied or untied embeddings, activation checkpointing
// chosen per decoder layer, and a KV cache for generation.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/ops.h"
#include "nn/chunked_loss.h"
#include "nn/layers.h"

namespace kiln::nn {

struct LlamaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless set
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  double initializer_range = 0.02;  // std of the normal init of random weights (HF's key)
  std::optional<RopeScaling> rope_scaling;  // only rope_type "llama3" (or none)
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  DType torch_dtype = DType::f32;  // the checkpoint's dtype

  // A HF config.json text; `source` names it in errors. Unsupported settings are errors.
  static LlamaConfig from_json(const std::string& text, const std::string& source = "config.json");
  static LlamaConfig from_file(const std::string& path);
  // A config by name ("llama3.1-8b", "tiny") or a path to a config.json.
  static LlamaConfig named(const std::string& name_or_path);
  std::string to_json() const;  // HF's config.json keys
  void validate() const;
  int64_t num_parameters() const;
};

// Keys and values of past tokens, per layer: (B, Hkv, capacity, D) buffers filled up to `length`.
struct KVCache {
  struct Layer {
    Tensor k, v;
  };
  std::vector<Layer> layers;
  int64_t length = 0;
  int64_t capacity = 0;
};

class LlamaAttention : public Module {
 public:
  LlamaAttention(const LlamaConfig& c, DType dtype, Device device, const Init& init,
                 std::shared_ptr<RotaryEmbedding> rope);
  std::string type_name() const override { return "LlamaAttention"; }
  // x (B, T, hidden) at positions start .. start+T-1 -> (B, T, hidden). With a cache, this call's
  // keys/values are written at [start, start+T) and attention sees positions [0, start+T). With a
  // residual (B, T, hidden): residual + attention(x), the add in o_proj's GEMM where it can be.
  Tensor forward(const Tensor& x, int64_t start = 0, KVCache::Layer* cache = nullptr, const Tensor& residual = Tensor());
  Tensor operator()(const Tensor& x, int64_t start = 0, KVCache::Layer* cache = nullptr);  // through the hooks

 private:
  int64_t heads_, kv_heads_, head_dim_;
  std::shared_ptr<RotaryEmbedding> rope_;
};

class LlamaMLP : public Module {
 public:
  LlamaMLP(const LlamaConfig& c, DType dtype, Device device, const Init& init);
  std::string type_name() const override { return "LlamaMLP"; }
  // down(silu(gate(x)) * up(x)); with a residual (x's shape): residual + that, the add in down_proj's GEMM
  // where it can be.
  Tensor forward(const Tensor& x, const Tensor& residual = Tensor());
  // forward through the module's hooks (Module::call_forward)
  Tensor operator()(const Tensor& x) { return call_forward1(x, [this](const Tensor& v) { return forward(v); }); }
  // Sequence chunks for long sequences (0: off): the MLP runs on at most `tokens` tokens at a time,
  // so its (tokens, intermediate) tensors exist for one chunk only; in grad mode the chunks are
  // checkpointed (autograd::checkpoint_chunks: only the input is kept, each chunk runs again in
  // backward: one more MLP forward). In a decoder layer the post-attention norm and the residual add
  // go into the chunks too, so the layer keeps neither the norm's output nor the MLP's for backward.
  void set_sequence_chunk(int64_t tokens);
  int64_t sequence_chunk() const { return chunk_; }

 private:
  Tensor run(const Tensor& x, const Tensor& residual);  // the MLP on one chunk
  int64_t chunk_ = 0;
};

class LlamaDecoderLayer : public Module {
 public:
  LlamaDecoderLayer(const LlamaConfig& c, DType dtype, Device device, const Init& init,
                    std::shared_ptr<RotaryEmbedding> rope);
  std::string type_name() const override { return "LlamaDecoderLayer"; }
  Tensor forward(const Tensor& x, int64_t start = 0, KVCache::Layer* cache = nullptr);
  Tensor operator()(const Tensor& x, int64_t start = 0, KVCache::Layer* cache = nullptr);  // through the hooks
};

// What a decoder layer keeps for backward when it trains (Llama::set_layer_activations).
enum class LayerActivations : uint8_t {
  keep,        // every tensor its backward uses
  checkpoint,  // only its input; its forward runs again in backward
  offload,     // checkpointed, its input, attention output and LSE waiting in pinned host memory; the
               // recompute skips attention (autograd::CheckpointOptions offload and save)
  offload_qkv, // offload, and q, k, v and the residual stream after attention wait on the host too: the
               // recompute also skips the q, k, v and o projections (CheckpointOptions::keep_marked)
  segment,     // nothing, not even its input: it belongs to the segment that the nearest layer below it
               // not marked segment starts (checkpoint or offload; offloaded, only the segment's input goes
               // to the host). Backward runs the segment's forward again, each of its layers checkpointed,
               // then their backward top down: every layer of a segment runs forward three times, and a
               // segment of g layers holds g layer inputs at most, for sequences whose per-layer inputs
               // alone would not fit
};
// "keep", "checkpoint", "offload", "qkv-offload", "segment" (first letters distinct: a layer's key letter)
const char* layer_activations_name(LayerActivations a);
// A kiln::Error when a layer marked segment is the first or follows a layer kept whole.
void check_segments(const std::vector<LayerActivations>& per_layer);
// `layers` decoder layers in segments of `g` (g >= 2): each segment's first layer offloaded for the lowest
// `offloaded` segments, checkpointed above them; the others LayerActivations::segment.
std::vector<LayerActivations> in_segments(int64_t layers, int64_t g, int64_t offloaded);
inline bool is_offloaded(LayerActivations a) { return a == LayerActivations::offload || a == LayerActivations::offload_qkv; }

struct LlamaOptions {
  DType dtype = DType::f32;   // parameters and activations
  Device device = kCPU;
  uint64_t seed = 0;          // random init: N(0, 0.02) linears/embedding as HF initialises
  bool random_init = true;    // false: parameters start at zero (to be loaded by the caller)
  bool checkpoint_activations = false;  // every decoder layer (Llama::set_layer_activations: a per-layer choice)
  // Called after each decoder layer is built (and filled from `source` when loading), before the
  // next one: quantising here keeps the peak near one layer's size (QLoRA's NF4 base).
  std::function<void(const std::string& prefix, LlamaDecoderLayer& layer)> on_layer_built;
};

// Checkpoint tensors by HF key (any device and dtype), e.g. a HF folder's safetensors files.
struct WeightSource {
  std::string origin;              // for errors: the folder or file
  std::vector<std::string> keys;   // every key it holds
  std::function<Tensor(const std::string& key)> get;  // error naming the key when absent
};

// The inner "model": embed_tokens, layers.N, norm.
class LlamaModel : public Module {
 public:
  LlamaModel(const LlamaConfig& c, const LlamaOptions& o, const WeightSource* source);
  std::string type_name() const override { return "LlamaModel"; }
  // (B, T) -> (B, T, hidden). `activations`: one entry per decoder layer (checkpoint and offload
  // apply when grad mode is on and there is no cache), or empty to keep everything.
  Tensor forward(const Tensor& ids, int64_t start, KVCache* cache, const std::vector<LayerActivations>& activations);
  Tensor operator()(const Tensor& ids, int64_t start, KVCache* cache,
                    const std::vector<LayerActivations>& activations);  // through the hooks
  int64_t num_layers() const { return child_as<ModuleList>("layers").size(); }
};

// LlamaForCausalLM: model + lm_head (the embedding matrix when tied).
class Llama : public Module {
 public:
  Llama(const LlamaConfig& config, const LlamaOptions& options = {}, const WeightSource* source = nullptr);
  // A HF model folder: config.json + model.safetensors or a sharded index. Weights are converted
  // to options.dtype on options.device layer by layer; missing, unexpected or mis-shaped keys are
  // errors naming the key.
  static std::shared_ptr<Llama> from_pretrained(const std::string& dir, LlamaOptions options = {});
  std::string type_name() const override { return "Llama"; }

  const LlamaConfig& config() const { return config_; }
  LlamaModel& model() const { return child_as<LlamaModel>("model"); }
  // What each decoder layer keeps for backward in training mode (LayerActivations): a checkpointed
  // layer keeps only its input and runs its forward again in backward; an offloaded one keeps that
  // input in host memory. set_checkpoint_activations: every layer checkpointed, or every layer kept;
  // set_layer_activations: one entry per decoder layer.
  void set_checkpoint_activations(bool on);
  void set_layer_activations(std::vector<LayerActivations> per_layer);
  const std::vector<LayerActivations>& layer_activations() const { return activations_; }
  // ChunkedLossOptions::memory_budget_bytes of chunked_loss (default 2 GiB): it sets the chunk size
  // (nn::chunked_loss_chunk_size; the built-in cross-entropy takes V * itemsize bytes per token).
  void set_loss_memory_budget(size_t bytes);
  size_t loss_memory_budget() const { return loss_memory_budget_; }
  // LlamaMLP::set_sequence_chunk of every decoder layer (0: off).
  void set_mlp_chunk(int64_t tokens);
  int64_t mlp_chunk() const;
  // NF4Linear::keep_dequantized for the NF4 layers of the first `n` decoder layers, off for the rest:
  // those skip NF4 dequantisation, holding dequantized_layer_bytes() each.
  void set_dequantized_layers(int64_t n);
  int64_t dequantized_layers() const;
  // What one decoder layer's NF4 weights take dequantised in the model's dtype; 0 without NF4 layers.
  size_t dequantized_layer_bytes() const;

  // ids (B, T) int -> final hidden states (B, T, hidden) after the last norm.
  Tensor forward(const Tensor& ids, int64_t start = 0, KVCache* cache = nullptr);
  Tensor operator()(const Tensor& ids, int64_t start = 0, KVCache* cache = nullptr);  // through the hooks
  // hidden (..., hidden) -> logits (..., vocab) in the activation dtype.
  Tensor logits(const Tensor& hidden);
  // The (vocab, hidden) output projection (the embedding when tied).
  Tensor lm_head_weight() const;
  // Cross-entropy of the logits at each position against `targets` (B, T) (the next token, already
  // shifted; -100 ignored), computed in f32 over the full logits; mean over the scored tokens or sum.
  Tensor loss(const Tensor& hidden, const Tensor& targets, Reduction reduction = Reduction::mean);
  // The same through the chunked linear+cross-entropy head (nn/chunked_loss.h), with chunks of
  // loss_memory_budget(): the full logits never exist. Needs a plain (tied or Linear) output projection.
  // `overwrite_hidden`: the caller gives hidden up, and d(hidden) takes its memory
  // (ChunkedLossOptions::overwrite_hidden); the Trainer's loss does.
  Tensor chunked_loss(const Tensor& hidden, const Tensor& targets, Reduction reduction = Reduction::mean,
                      bool overwrite_hidden = false);

  KVCache make_cache(int64_t batch, int64_t capacity) const;

 private:
  LlamaConfig config_;
  LlamaOptions options_;
  std::vector<LayerActivations> activations_;  // per decoder layer
  size_t loss_memory_budget_ = ChunkedLossOptions{}.memory_budget_bytes;
};

// The weights of a HF model folder by key: model.safetensors, or the shards an index names.
WeightSource open_hf_weights(const std::string& dir);

}  // namespace kiln::nn

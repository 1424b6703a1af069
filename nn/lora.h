// LoRA: low-rank adapters around frozen linear layers (Linear or NF4Linear), and their files in
// PEFT's format (adapter_config.json + adapter_model.safetensors with the key names peft writes:
// "base_model.model.<module path>.lora_A.weight"), so transformers/peft load kiln's adapters.
#pragma once
#include <string>
#include <vector>

#include "core/random.h"
#include "nn/layers.h"

namespace kiln::nn {

struct LoraConfig {
  int64_t r = 16;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;  // scaling alpha / sqrt(r) instead of alpha / r
  // Module names to wrap: each entry matches a module whose path ends with it ("q_proj" matches
  // "model.layers.3.self_attn.q_proj"). `target_regex`, when set, is matched against the whole path
  // instead (peft's string form of target_modules).
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  std::string target_regex;
  std::string base_model_name_or_path;  // recorded in adapter_config.json

  double scaling() const;
  void validate() const;
  bool matches(const std::string& module_path) const;
  std::string to_peft_json() const;
  static LoraConfig from_peft_json(const std::string& text, const std::string& source = "adapter_config.json");
};

// base(x) + scaling * dropout(x) @ A^T @ B^T. A (r, in) and B (out, r) are f32 parameters
// ("lora_A.weight", "lora_B.weight"), computed in x's dtype; the base ("base_layer") is frozen.
class LoraLinear : public LinearBase {
 public:
  LoraLinear(std::shared_ptr<LinearBase> base, const LoraConfig& config, Generator* gen = nullptr);
  std::string type_name() const override { return "LoraLinear"; }
  Tensor forward(const Tensor& x) override;

  LinearBase& base() const { return child_as<LinearBase>("base_layer"); }
  Tensor lora_a() const;  // (r, in)
  Tensor lora_b() const;  // (out, r)
  double scaling() const { return scaling_; }
  double dropout_rate() const { return dropout_; }
  // y + scaling * u @ B^T, B cast to u's dtype: one GEMM with y (..., out) as its addend, u (..., r) the
  // adapter's first product (x @ A^T, from forward or from shared_input_forward).
  Tensor add_up(const Tensor& u, const Tensor& y) const;
  // Folds scaling * B @ A into the base weight (a Linear base only) and stops adding the adapter;
  // unmerge() subtracts it again.
  void merge();
  void unmerge();
  bool merged() const { return merged_; }

  // The base follows the model's dtype; A and B only move (they stay f32).
  void apply_to(std::optional<Device> device, std::optional<DType> dtype) override;

 protected:
  Tensor forward_add(const Tensor& x, const Tensor& residual) override;

 private:
  void add_delta(const Tensor& weight, double sign) const;  // weight += sign * scaling * B @ A
  double scaling_;
  double dropout_;
  bool merged_ = false;
};

// The outputs of `layers` on one input x, each as (*layers[i])(x) gives it. Where they are LoRA layers of one
// rank, scaling and device, unmerged, without forward hooks of their own and without dropout at work (eval, or
// a rate of 0), their adapters share x's GEMMs: u = x @ [A_1; ...; A_n]^T is one product (..., n*r), and its
// backward one dA and one dx product instead of n each (q, k, v; gate, up). Otherwise (fewer than two layers,
// any other layer) each layer runs on its own. Every layer must take x's last dim. An adapter whose output
// takes no part in the loss gets a zero gradient for its A (its rows of the shared product), where on its own
// it would get none.
std::vector<Tensor> shared_input_forward(const std::vector<LinearBase*>& layers, const Tensor& x);

// Wraps every LinearBase below `root` whose path matches `config`, freezes every other parameter,
// and returns the wrapped paths. A (per module) draws from a generator seeded with `seed`; B starts at 0.
std::vector<std::string> apply_lora(Module& root, const LoraConfig& config, uint64_t seed = 0);
// Every LoraLinear below `root`, by path.
std::vector<std::pair<std::string, LoraLinear*>> lora_layers(Module& root);
void merge_lora(Module& root);
void unmerge_lora(Module& root);

// PEFT's adapter folder: adapter_config.json + adapter_model.safetensors (f32 tensors named
// "base_model.model.<path>.lora_A.weight" / "...lora_B.weight"). Written atomically.
void save_adapter(Module& root, const LoraConfig& config, const std::string& dir);
LoraConfig read_adapter_config(const std::string& dir);
// Loads an adapter folder into a model: wraps the modules it names (when not wrapped yet) and loads
// A and B. Missing, unexpected or mis-shaped tensors are errors naming the key; the model is only
// changed once everything has been checked.
LoraConfig load_adapter(Module& root, const std::string& dir);

}  // namespace kiln::nn

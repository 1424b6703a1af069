// The basic layers: Linear (and LinearBase, the interface LoRA and NF4 layers share), Embedding,
// RMSNorm and the rotary embedding with Llama 3.1's `llama3` frequency scaling.
#pragma once
#include <optional>
#include <vector>

#include "core/random.h"
#include "nn/module.h"

namespace kiln::nn {

// How a freshly built layer fills its weights.
struct Init {
  enum class Kind { normal, kaiming_uniform, zeros, uninitialized };  // uninitialized: to be loaded
  Kind kind = Kind::kaiming_uniform;
  double std = 0.02;             // for normal
  Generator* gen = nullptr;      // nullptr: the default generator
};

// Anything that maps (..., in_features) -> (..., out_features): Linear, NF4Linear, LoraLinear.
class LinearBase : public Module {
 public:
  LinearBase(int64_t in_features, int64_t out_features) : in_features_(in_features), out_features_(out_features) {}
  virtual Tensor forward(const Tensor& x) = 0;
  // forward through the module's hooks (Module::call_forward)
  Tensor operator()(const Tensor& x) { return call_forward1(x, [this](const Tensor& v) { return forward(v); }); }
  // residual + this layer(x), residual of the output's shape (a block's residual stream). Without hooks
  // on the layer the add runs in the GEMM's epilogue where the layer can (forward_add): one pass over
  // the output fewer, the sum rounded once.
  Tensor residual_add(const Tensor& residual, const Tensor& x);
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

 protected:
  virtual Tensor forward_add(const Tensor& x, const Tensor& residual);  // residual + forward(x), no hooks
  int64_t in_features_;
  int64_t out_features_;
};

// y = x @ weight^T + bias; weight (out, in), bias (out).
class Linear : public LinearBase {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = false, DType dtype = DType::f32, Device device = kCPU,
         Init init = {});
  std::string type_name() const override { return "Linear"; }
  Tensor forward(const Tensor& x) override;
  Tensor weight() const { return parameter("weight"); }  // (out, in)
  Tensor bias() const { return has_parameter("bias") ? parameter("bias") : Tensor(); }  // (out) or undefined

 protected:
  Tensor forward_add(const Tensor& x, const Tensor& residual) override;
};

// Whether `residual` can be the addend of the GEMM of a linear layer's input x (..., in) with `out`
// outputs: x's dtype and device, shape (..., out), contiguous.
bool gemm_addend_fits(const Tensor& residual, const Tensor& x, int64_t out);

// ids (...) int -> (..., dim) rows of weight (num_embeddings, dim).
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, DType dtype = DType::f32, Device device = kCPU, Init init = {});
  std::string type_name() const override { return "Embedding"; }
  Tensor forward(const Tensor& ids);
  // forward through the module's hooks (Module::call_forward)
  Tensor operator()(const Tensor& x) { return call_forward1(x, [this](const Tensor& v) { return forward(v); }); }
  Tensor weight() const { return parameter("weight"); }
};

// x / rms(x) * weight over the last dim; weight (dim) starts at ones.
class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, double eps, DType dtype = DType::f32, Device device = kCPU);
  std::string type_name() const override { return "RMSNorm"; }
  Tensor forward(const Tensor& x);
  // forward through the module's hooks (Module::call_forward)
  Tensor operator()(const Tensor& x) { return call_forward1(x, [this](const Tensor& v) { return forward(v); }); }
  double eps() const { return eps_; }

 private:
  double eps_;
};

// Llama 3.1's rope_scaling {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
// original_max_position_embeddings}; absent = plain RoPE.
struct RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The (head_dim / 2) inverse frequencies theta^(-2i/d), rescaled per llama3 when `scaling` is set.
std::vector<double> rope_inverse_frequencies(int64_t head_dim, double theta, const std::optional<RopeScaling>& scaling);

// cos/sin tables (T, head_dim/2) in f32 for positions [start, start + T), computed once per device
// up to the longest length asked for and sliced after that.
class RotaryEmbedding {
 public:
  RotaryEmbedding(int64_t head_dim, double theta, std::optional<RopeScaling> scaling);
  // x (B, H, T, head_dim) rotated for positions start .. start + T - 1.
  Tensor apply(const Tensor& x, int64_t start = 0);
  // The same with the heads after the positions: x (B, T, H, head_dim) (the tables broadcast over H).
  Tensor apply_heads_last(const Tensor& x, int64_t start = 0);
  std::pair<Tensor, Tensor> tables(int64_t start, int64_t length, Device device);

 private:
  int64_t head_dim_;
  std::vector<double> inv_freq_;
  struct Tables {
    Device device;
    Tensor cos, sin;  // (T_cached, head_dim/2) f32
  };
  std::vector<Tables> cache_;
};

}  // namespace kiln::nn

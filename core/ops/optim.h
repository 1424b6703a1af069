// Optimiser primitives: AdamWStep, the fused in-place multi-tensor AdamW update (torch.optim.AdamW's
// formulas, f32 state, f32/bf16/f16 parameters updated in f32 and rounded once), and its public
// entry point adamw_step_; the multi-tensor L2 norm and in-place scale behind clip_grad_norm_. On
// CUDA one kernel launch walks every tensor of the call.
#pragma once
#include <vector>

#include "core/primitive.h"

namespace kiln {

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// For each i: params[i] (any float dtype, all one dtype and device, contiguous) is updated in place
// with grads[i] (same shape and dtype; made contiguous here) and the f32 contiguous state
// exp_avgs[i] / exp_avg_sqs[i], using bias corrections of steps[i] (>= 1, already incremented):
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2 v + (1-b2) g^2;
//   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
// Writes through dispatch_into, so a parameter that requires grad needs autograd::NoGradGuard.
void adamw_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                 const std::vector<int64_t>& steps, const AdamWHyper& hyper);

// sqrt(sum over all `tensors` of sum(x^2)): the L2 norm of them all taken together, as a 0-d f32
// tensor on their device (no host synchronisation). Tensors: f32, bf16 or f16 (mixed dtypes allowed),
// one device, non-empty list; non-contiguous ones are made contiguous first. Squares are summed in
// f32 (the CPU kernel in f64) in a fixed order, so the result is deterministic; a non-finite element
// gives a non-finite norm. On CUDA: one launch for every tensor, one to sum the per-chunk partials.
Tensor multi_tensor_l2_norm(const std::vector<Tensor>& tensors);

// Multiplies each of `tensors` (f32, bf16 or f16, mixed allowed, contiguous, one device) in place by
// `scale` rounded to f32; each element is computed in f32 and rounded once to its dtype (as
// copy_(t, mul(cast(t, f32), scale))). One launch on CUDA. Writes through dispatch_into, so a tensor
// that requires grad needs autograd::NoGradGuard.
void multi_tensor_scale_(const std::vector<Tensor>& tensors, double scale);

namespace prim {

// inputs: the tensors; output: the 0-d f32 norm (see multi_tensor_l2_norm).
class MultiTensorL2Norm final : public Primitive {
 public:
  const char* name() const override { return "multi_tensor_l2_norm"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
};

// inputs: the n tensors; outputs (written in place): the same n tensors.
class MultiTensorScale final : public Primitive {
 public:
  explicit MultiTensorScale(float scale) : scale_(scale) {}
  const char* name() const override { return "multi_tensor_scale"; }
  std::vector<Attr> attrs() const override { return {{"scale", static_cast<double>(scale_)}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  float scale() const { return scale_; }

 private:
  float scale_;
};

// inputs: the n grads; outputs (written in place): the n params, then the n exp_avgs, then the n
// exp_avg_sqs.
class AdamWStep final : public Primitive {
 public:
  AdamWStep(AdamWHyper hyper, std::vector<int64_t> steps) : hyper_(hyper), steps_(std::move(steps)) {}
  const char* name() const override { return "adamw_step"; }
  std::vector<Attr> attrs() const override {
    return {{"lr", hyper_.lr},     {"beta1", hyper_.beta1},
            {"beta2", hyper_.beta2}, {"eps", hyper_.eps},
            {"weight_decay", hyper_.weight_decay}, {"steps", steps_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  const AdamWHyper& hyper() const { return hyper_; }
  const std::vector<int64_t>& steps() const { return steps_; }
  // The f32 scalars every backend uses for tensor i (computed in f64, rounded once, as torch does
  // with its python-float scalars): p *= decay; step_size = lr/(1-b1^t); bc2_sqrt = sqrt(1-b2^t).
  float decay() const;
  float step_size(size_t i) const;
  float bias_correction2_sqrt(size_t i) const;

 private:
  AdamWHyper hyper_;
  std::vector<int64_t> steps_;
};

}  // namespace prim
}  // namespace kiln

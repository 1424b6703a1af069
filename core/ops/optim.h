// Optimiser primitives: AdamWStep, the fused in-place multi-tensor AdamW update (torch.optim.AdamW's
// formulas, f32 state, f32/bf16/f16 parameters updated in f32 and rounded once), and its public
// entry point adamw_step_. On CUDA one kernel launch updates every tensor of the call.
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

namespace prim {

// inputs: the n grads; outputs (written in place): the n params, then the n exp_avgs, then the n
// exp_avg_sqs.
class AdamWStep final : public Primitive {
 public:
  AdamWStep(AdamWHyper hyper, std::vector<int64_t> steps) : hyper_(hyper), steps_(std::move(steps)) {}
  const char* name() const override { return "adamw_step"; }
  std::string attributes() const override;
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

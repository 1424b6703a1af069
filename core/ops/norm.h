// Normalisation primitives: RmsNorm and its backward. The fused op has dedicated kernels
// (core/cpu/norm.cpp, core/cuda/norm.cu) and a composite fallback, rms_norm_composite (core/ops.h).
#pragma once
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

// x (..., D), weight (D) of x's dtype -> x * rsqrt(mean(x^2, -1) + eps) * weight, computed in f32
// for bf16/f16/f32 and f64 for f64, rounded once.
class RmsNorm : public Primitive {
 public:
  explicit RmsNorm(double eps) : eps_(eps) {}
  const char* name() const override { return "rms_norm"; }
  std::vector<Attr> attrs() const override { return {{"eps", eps_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  // dx summed with the gradient already gathered for x (a residual stream's), in the backward kernel.
  std::vector<Tensor> vjp_accumulating(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                       const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted,
                                       std::vector<Tensor>& addends) const override;
  bool vjp_needs_outputs() const override { return false; }
  double eps() const { return eps_; }

 private:
  double eps_;
};

// x (..., D), weight (D), g (..., D) [, addend (..., D)] -> dx (..., D) (plus the addend,
// rounded once), dw (D) (summed over every row in a fixed order). Second-order gradients through it
// are not implemented (use rms_norm_composite).
class RmsNormBackward : public Primitive {
 public:
  explicit RmsNormBackward(double eps) : eps_(eps) {}
  const char* name() const override { return "rms_norm_backward"; }
  std::vector<Attr> attrs() const override { return {{"eps", eps_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  double eps() const { return eps_; }

 private:
  double eps_;
};

}  // namespace kiln::prim

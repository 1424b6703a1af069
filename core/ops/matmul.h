// The matmul primitive: alpha (A @ B), (..., M, K) @ (..., K, N) -> (..., M, N) with numpy broadcasting
// of the batch dims, floating dtypes only (bf16/f16 accumulate in f32); alpha (default 1) scales the
// product in the GEMM (cuBLASLt's alpha). An optional third input C of the product's exact shape and
// dtype is added in the GEMM's epilogue (alpha A @ B + C, rounded once: cuBLASLt's beta = 1), which is
// how compile/ folds an add of a GEMM output into the GEMM. Its vjp is two more matmuls (scaled by
// alpha), summed down to each operand's shape where the batch was broadcast (and C's, the cotangent).
#pragma once
#include <vector>

#include "core/primitive.h"

namespace kiln::prim {

class Matmul : public Primitive {
 public:
  explicit Matmul(double alpha = 1.0) : alpha_(alpha) {}
  const char* name() const override { return "matmul"; }
  std::vector<Attr> attrs() const override { return {{"alpha", alpha_}}; }
  double alpha() const { return alpha_; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  // dA = g @ B^T and dB = A^T @ g (dC = g): inputs, no output.
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  // dA or dB summed with the gradient already gathered, as the addend of its GEMM.
  std::vector<Tensor> vjp_accumulating(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                       const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted,
                                       std::vector<Tensor>& addends) const override;
  bool vjp_needs_outputs() const override { return false; }
  bool vjp_needs_input(size_t i) const override { return i < 2; }  // not the addend

 private:
  double alpha_;
};

}  // namespace kiln::prim

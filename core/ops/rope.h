// Rotary position embedding (RoPE, Llama's rotate_half layout): the RotaryEmbedding primitive, whose
// vjp is the inverse rotation. Kernels in core/cpu/rope.cpp and core/cuda/rope.cu; composite fallback
// rotary_embedding_composite (core/ops.h).
#pragma once
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

// x (..., T, D) with D even, cos and sin (T, D/2) or any shape (..., T, D/2) broadcasting against x's
// leading dims (e.g. (B, 1, T, D/2) for per-sequence positions); cos/sin share one dtype, x's or f32.
// Llama "rotate_half" layout: pairs (x[i], x[i + D/2]). The vjp is the inverse rotation (sin
// negated); cos and sin get no gradient (they are a position table).
class RotaryEmbedding : public Primitive {
 public:
  const char* name() const override { return "rotary_embedding"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_input(size_t i) const override { return i > 0; }  // the rotation needs cos and sin, not x
  bool vjp_needs_outputs() const override { return false; }
};

}  // namespace kiln::prim

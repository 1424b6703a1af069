// Fused activation primitives: SwiGlu (silu(gate) * up, Llama's gated MLP) and its backward.
// Kernels in core/cpu/activation.cpp and core/cuda/activation.cu; composite fallback swiglu_composite
// (core/ops.h).
#pragma once
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

// gate (...), up (...) of one shape and float dtype -> silu(gate) * up, computed in f32 (f64 for
// f64) and rounded once: the gated MLP activation of Llama.
class SwiGlu : public Primitive {
 public:
  const char* name() const override { return "swiglu"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
};

// (gate, up, g) of one shape -> dgate = g * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),
// dup = g * silu(gate). Second-order gradients are not implemented (use swiglu_composite).
class SwiGluBackward : public Primitive {
 public:
  const char* name() const override { return "swiglu_backward"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
};

}  // namespace kiln::prim

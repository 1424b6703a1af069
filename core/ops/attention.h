// Scaled dot-product attention primitives (forward with log-sum-exp, backward). Kernels in
// core/cpu/attention.cpp and core/cuda/attention*.cu (kiln's flash kernel) + sdpa_cudnn.cpp (cuDNN);
// composite fallback scaled_dot_product_attention_composite (core/ops.h).
#pragma once
#include <optional>
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

// q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), Hq % Hkv == 0 (query head h reads kv head
// h / (Hq / Hkv)) -> out (B, Hq, T, Dv) in q's dtype and lse (B, Hq, T), the log-sum-exp of each
// row's scaled scores, in f32 (f64 for f64 inputs). Causal masks align bottom-right: query t sees
// keys s <= t + S - T; a query that sees no key (only when T > S) gives zeros and lse = -inf.
// Softmax is computed in f32 (f64 for f64). lse is differentiable too (ring/chunked attention
// merges partial results through it).
// heads_last: q (B, T, Hq, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv) and out (B, T, Hq, Dv), the heads
// after the positions (a projection's output viewed as heads; out viewed as (B, T, Hq*Dv) without a
// copy); lse stays (B, Hq, T). Kernels see every operand as (B, H, T, D) through sdpa_heads_view.
class ScaledDotProductAttention : public Primitive {
 public:
  ScaledDotProductAttention(bool causal, double scale, bool heads_last = false)
      : causal_(causal), scale_(scale), heads_last_(heads_last) {}
  const char* name() const override { return "scaled_dot_product_attention"; }
  std::vector<Attr> attrs() const override {
    return {{"causal", causal_}, {"scale", scale_}, {"heads_last", heads_last_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool causal() const { return causal_; }
  double scale() const { return scale_; }
  bool heads_last() const { return heads_last_; }

 private:
  bool causal_;
  double scale_;
  bool heads_last_;
};

// (q, k, v, out, lse, dout, dlse) -> (dq, dk, dv); dk/dv sum over the query heads of their group.
// Probabilities are recomputed from lse. heads_last as the forward's (q, k, v, out, dout and the
// gradients (B, T, H, D); lse, dlse (B, Hq, T)). Second-order gradients are not implemented (use
// scaled_dot_product_attention_composite).
class SdpaBackward : public Primitive {
 public:
  SdpaBackward(bool causal, double scale, bool heads_last = false)
      : causal_(causal), scale_(scale), heads_last_(heads_last) {}
  const char* name() const override { return "sdpa_backward"; }
  std::vector<Attr> attrs() const override {
    return {{"causal", causal_}, {"scale", scale_}, {"heads_last", heads_last_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool causal() const { return causal_; }
  double scale() const { return scale_; }
  bool heads_last() const { return heads_last_; }

 private:
  bool causal_;
  double scale_;
  bool heads_last_;
};

// A heads_last operand (B, T, H, D) as (B, H, T, D): an alias with swapped strides, made without
// dispatch (for kernels and shape rules; no autograd history).
Tensor sdpa_heads_view(const Tensor& t);

}  // namespace kiln::prim

namespace kiln {

// scaled_dot_product_attention (core/ops.h) with the heads after the positions: q (B, T, Hq, D),
// k/v (B, S, Hkv, D) -> (B, T, Hq, D), so neither a projection's output nor the result is copied into
// another layout (prim::ScaledDotProductAttention's heads_last).
Tensor scaled_dot_product_attention_heads_last(const Tensor& q, const Tensor& k, const Tensor& v, bool causal = true,
                                               std::optional<double> scale = std::nullopt);

}  // namespace kiln

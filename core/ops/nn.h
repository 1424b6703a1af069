// Primitives of the neural-network ops (embedding, RMSNorm, rotary embedding, attention,
// cross-entropy, SwiGLU) and of their backward passes. Each forward has a dedicated CPU kernel
// (core/cpu/nn*.cpp) and a composite fallback in core/ops.h (the *_composite functions).
#pragma once
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

const char* reduction_name(Reduction r);

// weight (V, D) float, ids (...) i64/i32 -> (..., D). An id outside [0, V) is an error (found by the
// kernel, which names the id and V). No gradient for ids.
class Embedding : public Primitive {
 public:
  const char* name() const override { return "embedding"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
};

// grad (..., D), ids (...) -> (V, D): row v is the sum of the grad rows whose id is v, added in
// index order (deterministic). Linear in grad, so it has a vjp (embedding of the cotangent).
class EmbeddingBackward : public Primitive {
 public:
  explicit EmbeddingBackward(int64_t num_embeddings) : num_embeddings_(num_embeddings) {}
  const char* name() const override { return "embedding_backward"; }
  std::vector<Attr> attrs() const override { return {{"num_embeddings", num_embeddings_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
  int64_t num_embeddings() const { return num_embeddings_; }

 private:
  int64_t num_embeddings_;
};

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
  bool vjp_needs_outputs() const override { return false; }
  double eps() const { return eps_; }

 private:
  double eps_;
};

// x (..., D), weight (D), g (..., D) -> dx (..., D), dw (D) (summed over every row in a fixed
// order). Second-order gradients through it are not implemented (use rms_norm_composite).
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
  bool vjp_needs_outputs() const override { return false; }
};

// q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), Hq % Hkv == 0 (query head h reads kv head
// h / (Hq / Hkv)) -> out (B, Hq, T, Dv) in q's dtype and lse (B, Hq, T), the log-sum-exp of each
// row's scaled scores, in f32 (f64 for f64 inputs). Causal masks align bottom-right: query t sees
// keys s <= t + S - T; a query that sees no key (only when T > S) gives zeros and lse = -inf.
// Softmax is computed in f32 (f64 for f64). lse is differentiable too (ring/chunked attention
// merges partial results through it).
class ScaledDotProductAttention : public Primitive {
 public:
  ScaledDotProductAttention(bool causal, double scale) : causal_(causal), scale_(scale) {}
  const char* name() const override { return "scaled_dot_product_attention"; }
  std::vector<Attr> attrs() const override { return {{"causal", causal_}, {"scale", scale_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool causal() const { return causal_; }
  double scale() const { return scale_; }

 private:
  bool causal_;
  double scale_;
};

// (q, k, v, out, lse, dout, dlse) -> (dq, dk, dv); dk/dv sum over the query heads of their group.
// Probabilities are recomputed from lse. Second-order gradients are not implemented (use
// scaled_dot_product_attention_composite).
class SdpaBackward : public Primitive {
 public:
  SdpaBackward(bool causal, double scale) : causal_(causal), scale_(scale) {}
  const char* name() const override { return "sdpa_backward"; }
  std::vector<Attr> attrs() const override { return {{"causal", causal_}, {"scale", scale_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool causal() const { return causal_; }
  double scale() const { return scale_; }

 private:
  bool causal_;
  double scale_;
};

// logits (N, V) float, targets (N) i64/i32 -> per-row lse - logit[target] (computed in f32, f64 for
// f64) reduced as asked, in logits' dtype: (N) for none (0 at ignored rows), 0-d for sum/mean; mean
// divides by the count of non-ignored rows and is 0 when every row is ignored. A target outside
// [0, V) that is not ignore_index is an error naming the row and the value. check_targets = false
// (cross_entropy_unchecked: the caller validated the targets) skips that check where it costs a host
// synchronisation (CUDA); such a target then gives an unspecified loss (never an out-of-bounds read).
// The CPU kernel checks regardless (free there).
class CrossEntropy : public Primitive {
 public:
  CrossEntropy(int64_t ignore_index, Reduction reduction, bool check_targets = true)
      : ignore_index_(ignore_index), reduction_(reduction), check_targets_(check_targets) {}
  const char* name() const override { return "cross_entropy"; }
  std::vector<Attr> attrs() const override {
    return {{"ignore_index", ignore_index_},
            {"reduction", EnumAttr{static_cast<int64_t>(reduction_), reduction_name(reduction_)}},
            {"check_targets", check_targets_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
  int64_t ignore_index() const { return ignore_index_; }
  Reduction reduction() const { return reduction_; }
  bool check_targets() const { return check_targets_; }

 private:
  int64_t ignore_index_;
  Reduction reduction_;
  bool check_targets_;
};

// (logits (N, V), targets (N), grad of the loss (N) or 0-d) -> dlogits = (softmax - onehot) * scale
// per row, zero at ignored rows. Second-order gradients are not implemented (use
// cross_entropy_composite). check_targets as for CrossEntropy; CrossEntropy's vjp builds it with
// check_targets = false, since the forward already validated (or was told to trust) the same targets.
class CrossEntropyBackward : public Primitive {
 public:
  CrossEntropyBackward(int64_t ignore_index, Reduction reduction, bool check_targets = true)
      : ignore_index_(ignore_index), reduction_(reduction), check_targets_(check_targets) {}
  const char* name() const override { return "cross_entropy_backward"; }
  std::vector<Attr> attrs() const override {
    return {{"ignore_index", ignore_index_},
            {"reduction", EnumAttr{static_cast<int64_t>(reduction_), reduction_name(reduction_)}},
            {"check_targets", check_targets_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  int64_t ignore_index() const { return ignore_index_; }
  Reduction reduction() const { return reduction_; }
  bool check_targets() const { return check_targets_; }

 private:
  int64_t ignore_index_;
  Reduction reduction_;
  bool check_targets_;
};

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

// Embedding, RMSNorm, rotary embedding, cross-entropy and SwiGLU: their public functions, shape rules and
// vjps, and the composite fallbacks built from other public ops. Attention lives in nn_attention.cpp.
#include "core/ops/nn.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

bool is_index(DType d) { return d == DType::i64 || d == DType::i32; }

// The dtype the composites compute in: f64 for f64, f32 for every other float.
DType compute_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

Tensor cast_to(const Tensor& x, DType d) { return x.dtype() == d ? x : cast(x, d); }

void check_embedding(const Tensor& weight, const Tensor& ids) {
  KILN_CHECK(weight.dim() == 2, "embedding", "weight must be 2-d (V, D), found shape {}", shape_str(weight.shape()));
  KILN_CHECK(is_floating(weight.dtype()), "embedding", "weight must be a float tensor, found {}",
             dtype_name(weight.dtype()));
  KILN_CHECK(is_index(ids.dtype()), "embedding", "ids must be i64 or i32, found {}", dtype_name(ids.dtype()));
}

void check_rms_norm(const Tensor& x, const Tensor& weight, double eps, const char* op) {
  KILN_CHECK(is_floating(x.dtype()), op, "x must be a float tensor, found {}", dtype_name(x.dtype()));
  KILN_CHECK(x.dim() >= 1, op, "x must have at least one dim, found a 0-d tensor");
  KILN_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, "weight must be ({},) to match x {}, found {}",
             x.size(-1), shape_str(x.shape()), shape_str(weight.shape()));
  KILN_CHECK(weight.dtype() == x.dtype(), op, "weight must have x's dtype {}, found {}", dtype_name(x.dtype()),
             dtype_name(weight.dtype()));
  KILN_CHECK(eps >= 0.0, op, "eps must be >= 0, found {}", eps);
}

void check_rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const char* op = "rotary_embedding";
  KILN_CHECK(is_floating(x.dtype()), op, "x must be a float tensor, found {}", dtype_name(x.dtype()));
  KILN_CHECK(x.dim() >= 2, op, "x must be (..., T, D), found shape {}", shape_str(x.shape()));
  const int64_t d = x.size(-1);
  KILN_CHECK(d % 2 == 0, op, "the last dim D of x must be even, found D = {} in {}", d, shape_str(x.shape()));
  KILN_CHECK(cos.shape() == sin.shape(), op, "cos and sin must have one shape, found {} and {}", shape_str(cos.shape()),
             shape_str(sin.shape()));
  KILN_CHECK(cos.dtype() == sin.dtype(), op, "cos and sin must have one dtype, found {} and {}", dtype_name(cos.dtype()),
             dtype_name(sin.dtype()));
  KILN_CHECK(cos.dtype() == x.dtype() || cos.dtype() == DType::f32, op,
             "cos/sin must have x's dtype {} or f32, found {}", dtype_name(x.dtype()), dtype_name(cos.dtype()));
  // cos (..., T, D/2) must broadcast to x's (..., T, D/2) without growing x
  bool ok = cos.dim() >= 2 && cos.dim() <= x.dim() && cos.size(-1) == d / 2;
  for (int64_t i = 2; ok && i <= cos.dim(); ++i) ok = cos.size(-i) == x.size(-i) || cos.size(-i) == 1;
  KILN_CHECK(ok, op, "cos/sin must be (T, D/2) = ({}, {}) or broadcast against x {} that way, found {}", x.size(-2),
             d / 2, shape_str(x.shape()), shape_str(cos.shape()));
}

void check_cross_entropy(const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy";
  KILN_CHECK(logits.dim() == 2, op, "logits must be 2-d (N, V), found shape {}", shape_str(logits.shape()));
  KILN_CHECK(is_floating(logits.dtype()), op, "logits must be a float tensor, found {}", dtype_name(logits.dtype()));
  KILN_CHECK(is_index(targets.dtype()), op, "targets must be i64 or i32, found {}", dtype_name(targets.dtype()));
  KILN_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
             "targets must be ({},) to match logits {}, found {}", logits.size(0), shape_str(logits.shape()),
             shape_str(targets.shape()));
}

void check_swiglu(const Tensor& gate, const Tensor& up, const char* op) {
  KILN_CHECK(is_floating(gate.dtype()), op, "gate must be a float tensor, found {}", dtype_name(gate.dtype()));
  KILN_CHECK(up.dtype() == gate.dtype(), op, "up must have gate's dtype {}, found {}", dtype_name(gate.dtype()),
             dtype_name(up.dtype()));
  KILN_CHECK(up.shape() == gate.shape(), op, "gate and up must have one shape, found {} and {}",
             shape_str(gate.shape()), shape_str(up.shape()));
}

Shape loss_shape(const Tensor& logits, Reduction r) {
  return r == Reduction::none ? Shape{logits.size(0)} : Shape{};
}

}  // namespace

namespace prim {

const char* reduction_name(Reduction r) {
  switch (r) {
    case Reduction::none: return "none";
    case Reduction::sum: return "sum";
    case Reduction::mean: return "mean";
  }
  return "?";
}

// ---- embedding

std::vector<TensorMeta> Embedding::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (weight, ids), found {}", in.size());
  check_embedding(in[0], in[1]);
  Shape out = in[1].shape();
  out.push_back(in[0].size(1));
  return {{out, in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> Embedding::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                   const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  return {dispatch1(std::make_shared<const EmbeddingBackward>(in[0].size(0)), {cot[0], in[1]}), Tensor()};
}

std::vector<TensorMeta> EmbeddingBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (grad, ids), found {}", in.size());
  const Tensor& g = in[0];
  KILN_CHECK(is_floating(g.dtype()), name(), "grad must be a float tensor, found {}", dtype_name(g.dtype()));
  KILN_CHECK(is_index(in[1].dtype()), name(), "ids must be i64 or i32, found {}", dtype_name(in[1].dtype()));
  Shape lead = in[1].shape();
  lead.push_back(g.dim() >= 1 ? g.size(-1) : -1);
  KILN_CHECK(g.shape() == lead, name(), "grad must be ids' shape {} plus (D,), found {}", shape_str(in[1].shape()),
             shape_str(g.shape()));
  KILN_CHECK(num_embeddings_ >= 0, name(), "num_embeddings must be >= 0, found {}", num_embeddings_);
  return {{{num_embeddings_, g.size(-1)}, g.dtype(), g.device()}};
}

std::vector<Tensor> EmbeddingBackward::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                           const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  return {embedding(cot[0], in[1]), Tensor()};
}

// ---- rms_norm

std::vector<TensorMeta> RmsNorm::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (x, weight), found {}", in.size());
  check_rms_norm(in[0], in[1], eps_, name());
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> RmsNorm::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                 const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  std::vector<Tensor> g = dispatch(std::make_shared<const RmsNormBackward>(eps_), {in[0], in[1], cot[0]});
  return {wanted[0] ? g[0] : Tensor(), wanted[1] ? g[1] : Tensor()};
}

std::vector<TensorMeta> RmsNormBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (x, weight, grad), found {}", in.size());
  check_rms_norm(in[0], in[1], eps_, name());
  KILN_CHECK(in[2].shape() == in[0].shape() && in[2].dtype() == in[0].dtype(), name(),
             "grad must match x {} {}, found {} {}", shape_str(in[0].shape()), dtype_name(in[0].dtype()),
             shape_str(in[2].shape()), dtype_name(in[2].dtype()));
  return {{in[0].shape(), in[0].dtype(), in[0].device()}, {in[1].shape(), in[1].dtype(), in[1].device()}};
}

std::vector<Tensor> RmsNormBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                         const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of rms_norm are not implemented; use rms_norm_composite");
}

// ---- rotary_embedding

std::vector<TensorMeta> RotaryEmbedding::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (x, cos, sin), found {}", in.size());
  check_rotary(in[0], in[1], in[2]);
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> RotaryEmbedding::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                         const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  // The rotation is orthogonal: its transpose rotates by -angle.
  if (!wanted[0]) return {Tensor(), Tensor(), Tensor()};
  return {rotary_embedding(cot[0], in[1], neg(in[2])), Tensor(), Tensor()};
}

// ---- cross_entropy

std::vector<TensorMeta> CrossEntropy::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (logits, targets), found {}", in.size());
  check_cross_entropy(in[0], in[1]);
  return {{loss_shape(in[0], reduction_), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> CrossEntropy::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                      const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  // The forward validated these targets (or its caller did): the backward does not check them again.
  return {dispatch1(std::make_shared<const CrossEntropyBackward>(ignore_index_, reduction_, false),
                    {in[0], in[1], cot[0]}),
          Tensor()};
}

std::vector<TensorMeta> CrossEntropyBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (logits, targets, grad), found {}", in.size());
  check_cross_entropy(in[0], in[1]);
  const Shape want = loss_shape(in[0], reduction_);
  KILN_CHECK(in[2].shape() == want && is_floating(in[2].dtype()), name(),
             "grad of the loss must be a float tensor of shape {}, found {} {}", shape_str(want),
             dtype_name(in[2].dtype()), shape_str(in[2].shape()));
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> CrossEntropyBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                              const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of cross_entropy are not implemented; use cross_entropy_composite");
}

// ---- swiglu

std::vector<TensorMeta> SwiGlu::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (gate, up), found {}", in.size());
  check_swiglu(in[0], in[1], name());
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> SwiGlu::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  std::vector<Tensor> g = dispatch(std::make_shared<const SwiGluBackward>(), {in[0], in[1], cot[0]});
  return {wanted[0] ? g[0] : Tensor(), wanted[1] ? g[1] : Tensor()};
}

std::vector<TensorMeta> SwiGluBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (gate, up, grad), found {}", in.size());
  check_swiglu(in[0], in[1], name());
  KILN_CHECK(in[2].shape() == in[0].shape() && in[2].dtype() == in[0].dtype(), name(),
             "grad must match gate {} {}, found {} {}", shape_str(in[0].shape()), dtype_name(in[0].dtype()),
             shape_str(in[2].shape()), dtype_name(in[2].dtype()));
  const TensorMeta m{in[0].shape(), in[0].dtype(), in[0].device()};
  return {m, m};
}

std::vector<Tensor> SwiGluBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                        const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of swiglu are not implemented; use swiglu_composite");
}

}  // namespace prim

// ---- public functions

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  return dispatch1(std::make_shared<const prim::Embedding>(), {weight, ids});
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return dispatch1(std::make_shared<const prim::RmsNorm>(eps), {x, weight});
}

Tensor rms_norm_composite(const Tensor& x, const Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps, "rms_norm");
  const DType ct = compute_dtype(x.dtype());
  Tensor xf = cast_to(x, ct);                                   // (..., D)
  Tensor r = rsqrt(add(mean(square(xf), {-1}, true), eps));     // (..., 1)
  return cast_to(mul(mul(xf, r), cast_to(weight, ct)), x.dtype());
}

Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return dispatch1(std::make_shared<const prim::RotaryEmbedding>(), {x, cos, sin});
}

Tensor rotary_embedding_composite(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  check_rotary(x, cos, sin);
  const DType ct = compute_dtype(x.dtype());
  const int64_t h = x.size(-1) / 2;
  Tensor xf = cast_to(x, ct);
  Tensor c = cast_to(cos, ct);  // (..., T, D/2)
  Tensor s = cast_to(sin, ct);
  Tensor x1 = narrow(xf, -1, 0, h);  // (..., T, D/2)
  Tensor x2 = narrow(xf, -1, h, h);
  Tensor y = cat({sub(mul(x1, c), mul(x2, s)), add(mul(x2, c), mul(x1, s))}, -1);  // (..., T, D)
  return cast_to(y, x.dtype());
}

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, Reduction reduction) {
  return dispatch1(std::make_shared<const prim::CrossEntropy>(ignore_index, reduction), {logits, targets});
}

Tensor cross_entropy_unchecked(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                               Reduction reduction) {
  return dispatch1(std::make_shared<const prim::CrossEntropy>(ignore_index, reduction, false), {logits, targets});
}

Tensor cross_entropy_composite(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                               Reduction reduction) {
  // Targets are not range-checked here (that needs their values on the host): an out-of-range
  // target simply picks no logit.
  check_cross_entropy(logits, targets);
  const DType ct = compute_dtype(logits.dtype());
  const int64_t v = logits.size(1);
  Tensor logp = log_softmax(cast_to(logits, ct), -1);                               // (N, V)
  Tensor tgt = cast_to(targets, DType::i64);                                        // (N)
  Tensor onehot = eq(unsqueeze(arange(v, DType::i64, logits.device()), 0), unsqueeze(tgt, 1));  // (N, V)
  Tensor zero = scalar_tensor(0.0, ct, logits.device());                            // () broadcast by where
  Tensor nll = neg(sum(where(onehot, logp, zero), {1}));                            // (N)
  Tensor valid = ne(tgt, static_cast<double>(ignore_index));                        // (N) bool
  nll = where(valid, nll, zero);
  switch (reduction) {
    case Reduction::none: return cast_to(nll, logits.dtype());
    case Reduction::sum: return cast_to(sum(nll), logits.dtype());
    case Reduction::mean: break;
  }
  Tensor count = sum(cast(valid, ct));  // 0-d; all ignored -> 0 / 1 = 0
  return cast_to(div(sum(nll), maximum(count, 1.0)), logits.dtype());
}

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  return dispatch1(std::make_shared<const prim::SwiGlu>(), {gate, up});
}

Tensor swiglu_composite(const Tensor& gate, const Tensor& up) {
  check_swiglu(gate, up, "swiglu");
  const DType ct = compute_dtype(gate.dtype());
  return cast_to(mul(silu(cast_to(gate, ct)), cast_to(up, ct)), gate.dtype());
}

}  // namespace kiln

// Scaled dot-product attention: the public function, the forward/backward primitives' shape rules
// and vjps, and the composite fallback (matmul + softmax + where, kv heads repeated by expand).
#include "core/ops/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "core/cpu/copy.h"
#include "core/dispatch.h"

namespace kiln {
namespace {

void check_sdpa(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  KILN_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
             "q must be (B, Hq, T, D) and k, v (B, Hkv, S, D), found q {}, k {}, v {}", shape_str(q.shape()),
             shape_str(k.shape()), shape_str(v.shape()));
  KILN_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(), op,
             "q, k, v must share one float dtype, found {}, {}, {}", dtype_name(q.dtype()), dtype_name(k.dtype()),
             dtype_name(v.dtype()));
  KILN_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, "batch sizes differ: q {}, k {}, v {}",
             shape_str(q.shape()), shape_str(k.shape()), shape_str(v.shape()));
  KILN_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), op,
             "k and v must have the same (B, Hkv, S), found k {} and v {}", shape_str(k.shape()), shape_str(v.shape()));
  KILN_CHECK(k.size(3) == q.size(3), op, "q and k head dims differ: q {}, k {}", shape_str(q.shape()),
             shape_str(k.shape()));
  KILN_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
             "query heads Hq = {} must be a multiple of kv heads Hkv = {}", q.size(1), k.size(1));
}

}  // namespace

namespace prim {

Tensor sdpa_heads_view(const Tensor& t) {
  KILN_CHECK(t.dim() == 4, "scaled_dot_product_attention", "heads_last operands are (B, T, H, D), found {}",
             shape_str(t.shape()));
  const Shape& s = t.shape();
  const Shape& st = t.strides();
  return cpu::raw_view(t, {s[0], s[2], s[1], s[3]}, {st[0], st[2], st[1], st[3]}, t.offset());
}

std::vector<TensorMeta> ScaledDotProductAttention::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (q, k, v), found {}", in.size());
  if (heads_last_) {
    for (const Tensor& t : in) KILN_CHECK(t.dim() == 4, name(), "heads_last q, k, v are (B, T, H, D), found {}", shape_str(t.shape()));
  }
  const Tensor q = heads_last_ ? sdpa_heads_view(in[0]) : in[0];  // (B, Hq, T, D)
  const Tensor k = heads_last_ ? sdpa_heads_view(in[1]) : in[1];
  const Tensor v = heads_last_ ? sdpa_heads_view(in[2]) : in[2];
  check_sdpa(q, k, v, name());
  const DType lse_dtype = compute_dtype(q.dtype());
  Shape out{q.size(0), q.size(1), q.size(2), v.size(3)};  // (B, Hq, T, Dv)
  if (heads_last_) std::swap(out[1], out[2]);
  return {{out, q.dtype(), q.device()}, {{q.size(0), q.size(1), q.size(2)}, lse_dtype, q.device()}};
}

std::vector<Tensor> ScaledDotProductAttention::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                                                   const std::vector<Tensor>& cot,
                                                   const std::vector<bool>& wanted) const {
  std::vector<Tensor> g = dispatch(std::make_shared<const SdpaBackward>(causal_, scale_, heads_last_),
                                   {in[0], in[1], in[2], out[0], out[1], cot[0], cot[1]});
  for (size_t i = 0; i < 3; ++i) {
    if (!wanted[i]) g[i] = Tensor();
  }
  return g;
}

std::vector<TensorMeta> SdpaBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 7, name(), "expected 7 inputs (q, k, v, out, lse, dout, dlse), found {}", in.size());
  if (heads_last_) {
    for (size_t i = 0; i < 3; ++i) {
      KILN_CHECK(in[i].dim() == 4, name(), "heads_last q, k, v are (B, T, H, D), found {}", shape_str(in[i].shape()));
    }
  }
  const Tensor q = heads_last_ ? sdpa_heads_view(in[0]) : in[0];  // (B, Hq, T, D)
  const Tensor k = heads_last_ ? sdpa_heads_view(in[1]) : in[1];
  const Tensor v = heads_last_ ? sdpa_heads_view(in[2]) : in[2];
  check_sdpa(q, k, v, name());
  Shape out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};  // (B, Hq, T, Dv), or (B, T, Hq, Dv)
  if (heads_last_) std::swap(out_shape[1], out_shape[2]);
  const Shape lse_shape{q.size(0), q.size(1), q.size(2)};
  for (size_t i : {size_t{3}, size_t{5}}) {
    KILN_CHECK(in[i].shape() == out_shape && in[i].dtype() == q.dtype(), name(), "{} must be {} {}, found {} {}",
               i == 3 ? "out" : "dout", shape_str(out_shape), dtype_name(q.dtype()), shape_str(in[i].shape()),
               dtype_name(in[i].dtype()));
  }
  for (size_t i : {size_t{4}, size_t{6}}) {
    KILN_CHECK(in[i].shape() == lse_shape && is_floating(in[i].dtype()), name(), "{} must be a float tensor {}, found {} {}",
               i == 4 ? "lse" : "dlse", shape_str(lse_shape), shape_str(in[i].shape()), dtype_name(in[i].dtype()));
  }
  return {{in[0].shape(), q.dtype(), q.device()}, {in[1].shape(), k.dtype(), k.device()}, {in[2].shape(), v.dtype(), v.device()}};
}

std::vector<Tensor> SdpaBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                      const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of attention are not implemented; use "
                    "scaled_dot_product_attention_composite");
}

}  // namespace prim

Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                    std::optional<double> scale) {
  check_sdpa(q, k, v, "scaled_dot_product_attention");
  const double sc = scale.value_or(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(q.size(3), 1))));
  return dispatch(std::make_shared<const prim::ScaledDotProductAttention>(causal, sc), {q, k, v})[0];
}

Tensor scaled_dot_product_attention_heads_last(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                               std::optional<double> scale) {
  const char* op = "scaled_dot_product_attention";
  KILN_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
             "q must be (B, T, Hq, D) and k, v (B, S, Hkv, D), found q {}, k {}, v {}", shape_str(q.shape()),
             shape_str(k.shape()), shape_str(v.shape()));
  check_sdpa(prim::sdpa_heads_view(q), prim::sdpa_heads_view(k), prim::sdpa_heads_view(v), op);
  const double sc = scale.value_or(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(q.size(3), 1))));
  return dispatch(std::make_shared<const prim::ScaledDotProductAttention>(causal, sc, true), {q, k, v})[0];
}

Tensor scaled_dot_product_attention_composite(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                              std::optional<double> scale) {
  check_sdpa(q, k, v, "scaled_dot_product_attention");
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), s = k.size(2), dv = v.size(3);
  const double sc = scale.value_or(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(d, 1))));
  const DType ct = compute_dtype(q.dtype());
  const Device dev = q.device();
  Tensor qf = cast(q, ct);  // (B, Hq, T, D)
  Tensor kf = cast(k, ct);  // (B, Hkv, S, D)
  Tensor vf = cast(v, ct);  // (B, Hkv, S, Dv)
  if (hq != hkv) {
    // each kv head serves G = Hq / Hkv consecutive query heads
    const int64_t g = hq / hkv;
    kf = reshape(expand(unsqueeze(kf, 2), {b, hkv, g, s, d}), {b, hq, s, d});
    vf = reshape(expand(unsqueeze(vf, 2), {b, hkv, g, s, dv}), {b, hq, s, dv});
  }
  Tensor scores = mul(matmul(qf, transpose(kf, -2, -1)), sc);  // (B, Hq, T, S)
  Tensor p;
  if (causal) {
    // query row i sees key j when j <= i + S - T (the last query sees the last key)
    Tensor rows = add(unsqueeze(arange(t, DType::i64, dev), 1), static_cast<double>(s - t));  // (T, 1)
    Tensor cols = unsqueeze(arange(s, DType::i64, dev), 0);                                  // (1, S)
    Tensor mask = le(cols, rows);                                                            // (T, S)
    const double inf = std::numeric_limits<double>::infinity();
    p = softmax(where(mask, scores, scalar_tensor(-inf, ct, dev)), -1);  // (B, Hq, T, S)
    // rows that see no key (T > S) are all -inf: softmax gives NaN there; those rows output zeros
    if (t > s) p = where(mask, p, scalar_tensor(0.0, ct, dev));
  } else {
    p = softmax(scores, -1);
  }
  return cast(matmul(p, vf), q.dtype());  // (B, Hq, T, Dv)
}

}  // namespace kiln

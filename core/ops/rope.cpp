// Rotary embedding: the public function, RotaryEmbedding's shape rule and vjp (the inverse rotation),
// and the composite fallback built from narrow/mul/cat.
#include "core/ops/rope.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

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

}  // namespace

namespace prim {

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

}  // namespace prim

Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return dispatch1(std::make_shared<const prim::RotaryEmbedding>(), {x, cos, sin});
}

Tensor rotary_embedding_composite(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  check_rotary(x, cos, sin);
  const DType ct = compute_dtype(x.dtype());
  const int64_t h = x.size(-1) / 2;
  Tensor xf = cast(x, ct);
  Tensor c = cast(cos, ct);  // (..., T, D/2)
  Tensor s = cast(sin, ct);
  Tensor x1 = narrow(xf, -1, 0, h);  // (..., T, D/2)
  Tensor x2 = narrow(xf, -1, h, h);
  Tensor y = cat({sub(mul(x1, c), mul(x2, s)), add(mul(x2, c), mul(x1, s))}, -1);  // (..., T, D)
  return cast(y, x.dtype());
}

}  // namespace kiln

// RMSNorm: the public function, the shape rules and vjps of RmsNorm and RmsNormBackward, and the
// composite fallback built from other public ops.
#include "core/ops/norm.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

void check_rms_norm(const Tensor& x, const Tensor& weight, double eps, const char* op) {
  KILN_CHECK(is_floating(x.dtype()), op, "x must be a float tensor, found {}", dtype_name(x.dtype()));
  KILN_CHECK(x.dim() >= 1, op, "x must have at least one dim, found a 0-d tensor");
  KILN_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, "weight must be ({},) to match x {}, found {}",
             x.size(-1), shape_str(x.shape()), shape_str(weight.shape()));
  KILN_CHECK(weight.dtype() == x.dtype(), op, "weight must have x's dtype {}, found {}", dtype_name(x.dtype()),
             dtype_name(weight.dtype()));
  KILN_CHECK(eps >= 0.0, op, "eps must be >= 0, found {}", eps);
}

}  // namespace

namespace prim {

std::vector<TensorMeta> RmsNorm::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (x, weight), found {}", in.size());
  check_rms_norm(in[0], in[1], eps_, name());
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> RmsNorm::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                                 const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  std::vector<Tensor> none(in.size());
  return vjp_accumulating(in, out, cot, wanted, none);
}

std::vector<Tensor> RmsNorm::vjp_accumulating(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                              const std::vector<Tensor>& cot, const std::vector<bool>& wanted,
                                              std::vector<Tensor>& addends) const {
  std::vector<Tensor> args = {in[0], in[1], cot[0]};
  Tensor& a = addends[0];
  const bool summed = wanted[0] && a.defined() && a.shape() == in[0].shape() && a.dtype() == in[0].dtype() &&
                      a.device() == in[0].device() && a.is_contiguous();
  if (summed) args.push_back(a);
  std::vector<Tensor> g = dispatch(std::make_shared<const RmsNormBackward>(eps_), args);
  if (summed) a = Tensor();
  return {wanted[0] ? g[0] : Tensor(), wanted[1] ? g[1] : Tensor()};
}

std::vector<TensorMeta> RmsNormBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3 || in.size() == 4, name(), "expected 3 or 4 inputs (x, weight, grad[, addend]), found {}",
             in.size());
  check_rms_norm(in[0], in[1], eps_, name());
  for (size_t i = 2; i < in.size(); ++i) {
    KILN_CHECK(in[i].shape() == in[0].shape() && in[i].dtype() == in[0].dtype() && in[i].device() == in[0].device(),
               name(), "{} must match x {} {} on {}, found {} {} on {}", i == 2 ? "grad" : "the addend",
               shape_str(in[0].shape()), dtype_name(in[0].dtype()), in[0].device().str(), shape_str(in[i].shape()),
               dtype_name(in[i].dtype()), in[i].device().str());
  }
  return {{in[0].shape(), in[0].dtype(), in[0].device()}, {in[1].shape(), in[1].dtype(), in[1].device()}};
}

std::vector<Tensor> RmsNormBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                         const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of rms_norm are not implemented; use rms_norm_composite");
}

}  // namespace prim

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return dispatch1(std::make_shared<const prim::RmsNorm>(eps), {x, weight});
}

Tensor rms_norm_composite(const Tensor& x, const Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps, "rms_norm");
  const DType ct = compute_dtype(x.dtype());
  Tensor xf = cast(x, ct);                                   // (..., D)
  Tensor r = rsqrt(add(mean(square(xf), {-1}, true), eps));     // (..., 1)
  return cast(mul(mul(xf, r), cast(weight, ct)), x.dtype());
}

}  // namespace kiln

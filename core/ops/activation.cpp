// SwiGLU: the public function, the shape rules and vjps of SwiGlu and SwiGluBackward, and the
// composite fallback silu(gate) * up.
#include "core/ops/activation.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

void check_swiglu(const Tensor& gate, const Tensor& up, const char* op) {
  KILN_CHECK(is_floating(gate.dtype()), op, "gate must be a float tensor, found {}", dtype_name(gate.dtype()));
  KILN_CHECK(up.dtype() == gate.dtype(), op, "up must have gate's dtype {}, found {}", dtype_name(gate.dtype()),
             dtype_name(up.dtype()));
  KILN_CHECK(up.shape() == gate.shape(), op, "gate and up must have one shape, found {} and {}",
             shape_str(gate.shape()), shape_str(up.shape()));
}

}  // namespace

namespace prim {

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

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  return dispatch1(std::make_shared<const prim::SwiGlu>(), {gate, up});
}

Tensor swiglu_composite(const Tensor& gate, const Tensor& up) {
  check_swiglu(gate, up, "swiglu");
  const DType ct = compute_dtype(gate.dtype());
  return cast(mul(silu(cast(gate, ct)), cast(up, ct)), gate.dtype());
}

}  // namespace kiln

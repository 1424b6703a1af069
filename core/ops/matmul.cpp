// matmul: the public function, the shape/dtype rule and the vjp of prim::Matmul. The vjp is
// written with matmul, transpose, reshape and sum_to, so backward passes through dispatch too.
#include "core/ops/matmul.h"

#include <algorithm>

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {

Tensor matmul(const Tensor& a, const Tensor& b) { return dispatch1(std::make_shared<const prim::Matmul>(), {a, b}); }

Tensor matmul(const Tensor& a, const Tensor& b, double alpha) {
  return dispatch1(std::make_shared<const prim::Matmul>(alpha), {a, b});
}

Tensor matmul_add(const Tensor& a, const Tensor& b, const Tensor& c, double alpha) {
  return dispatch1(std::make_shared<const prim::Matmul>(alpha), {a, b, c});
}

void matmul_into(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  KILN_CHECK(out.defined() && out.is_contiguous(), "matmul_into", "out must be a defined contiguous tensor");
  std::vector<Tensor> outs{out};
  std::vector<Tensor> in{a, b};
  if (accumulate) in.push_back(out);
  dispatch_into(std::make_shared<const prim::Matmul>(), in, outs);
}

namespace prim {

std::vector<TensorMeta> Matmul::infer(const std::vector<Tensor>& inputs) const {
  KILN_CHECK(inputs.size() == 2 || inputs.size() == 3, "matmul", "expected 2 inputs (or 3 with an addend), found {}",
             inputs.size());
  const Tensor& a = inputs[0];
  const Tensor& b = inputs[1];
  KILN_CHECK(a.dim() >= 2 && b.dim() >= 2, "matmul", "expected operands of at least 2 dims, found {} @ {}",
             shape_str(a.shape()), shape_str(b.shape()));
  KILN_CHECK(a.dtype() == b.dtype(), "matmul", "expected operands of one dtype, found {} and {}", dtype_name(a.dtype()),
             dtype_name(b.dtype()));
  KILN_CHECK(is_floating(a.dtype()), "matmul", "expected floating-point operands (f64, f32, bf16, f16), found {}",
             dtype_name(a.dtype()));
  const Shape& as = a.shape();
  const Shape& bs = b.shape();
  KILN_CHECK(as[as.size() - 1] == bs[bs.size() - 2], "matmul", "inner dimensions differ: {} @ {}", shape_str(as),
             shape_str(bs));
  for (size_t i = 3; i <= std::min(as.size(), bs.size()); ++i) {
    const int64_t da = as[as.size() - i], db = bs[bs.size() - i];
    KILN_CHECK(da == db || da == 1 || db == 1, "matmul", "batch dimensions of {} and {} cannot be broadcast",
               shape_str(as), shape_str(bs));
  }
  Shape batch = broadcast_shapes(Shape(as.begin(), as.end() - 2), Shape(bs.begin(), bs.end() - 2), "matmul");
  batch.push_back(as[as.size() - 2]);
  batch.push_back(bs[bs.size() - 1]);
  if (inputs.size() == 3) {
    const Tensor& c = inputs[2];
    KILN_CHECK(c.shape() == batch && c.dtype() == a.dtype() && c.device() == a.device(), "matmul",
               "expected an addend of the product's shape {}, dtype {} and device {}, found {} {} on {}", shape_str(batch),
               dtype_name(a.dtype()), a.device().str(), shape_str(c.shape()), dtype_name(c.dtype()), c.device().str());
  }
  return {TensorMeta{batch, a.dtype(), a.device()}};
}

std::vector<Tensor> Matmul::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  std::vector<Tensor> none(inputs.size());
  return vjp_accumulating(inputs, outputs, cotangents, wanted, none);
}

namespace {
// alpha (x @ y), plus `addend` in the GEMM when it is x @ y's shape, dtype and device (then undefined),
// so the caller gets the sum; otherwise the product alone.
Tensor product_plus(const Tensor& x, const Tensor& y, double alpha, Tensor& addend) {
  if (addend.defined()) {
    Shape shape = broadcast_shapes(Shape(x.shape().begin(), x.shape().end() - 2), Shape(y.shape().begin(), y.shape().end() - 2),
                                   "matmul");
    shape.push_back(x.shape()[x.shape().size() - 2]);
    shape.push_back(y.shape().back());
    if (addend.shape() == shape && addend.dtype() == x.dtype() && addend.device() == x.device()) {
      Tensor sum = matmul_add(x, y, addend, alpha);
      addend = Tensor();
      return sum;
    }
  }
  return matmul(x, y, alpha);
}
}  // namespace

std::vector<Tensor> Matmul::vjp_accumulating(const std::vector<Tensor>& inputs, const std::vector<Tensor>&,
                                             const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted,
                                             std::vector<Tensor>& addends) const {
  const Tensor& a = inputs[0];  // (..., M, K)
  const Tensor& b = inputs[1];  // (..., K, N)
  const Tensor& g = cotangents[0];  // (batch..., M, N)
  std::vector<Tensor> grads(inputs.size());
  if (inputs.size() == 3 && wanted[2]) grads[2] = g;  // the addend: the product's shape exactly
  if (wanted[0]) {
    // dA (batch..., M, K) = alpha g @ B^T, summed over the batch dims A was broadcast along
    grads[0] = sum_to(product_plus(g, transpose(b, -2, -1), alpha_, addends[0]), a.shape());
  }
  if (wanted[1]) {
    if (b.dim() == 2 && a.dim() > 2) {
      // B is shared by the whole batch: fold the batch into rows, dB (K, N) = alpha A (rows, K)^T @ g (rows, N),
      // which needs no (batch..., K, N) intermediate.
      const int64_t k = a.shape().back(), n = b.shape().back();
      grads[1] = product_plus(transpose(reshape(a, {-1, k}), 0, 1), reshape(g, {-1, n}), alpha_, addends[1]);
    } else {
      // dB (batch..., K, N) = alpha A^T @ g, summed over the batch dims B was broadcast along
      grads[1] = sum_to(product_plus(transpose(a, -2, -1), g, alpha_, addends[1]), b.shape());
    }
  }
  return grads;
}

}  // namespace prim
}  // namespace kiln

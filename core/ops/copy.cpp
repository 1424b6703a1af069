// contiguous, cast, to_device, copy_, fill_, cat, slice_backward.
#include "core/ops/copy.h"

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {
namespace prim {

std::vector<TensorMeta> Copy::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 1, "copy", "expected one input, got {}", in.size());
  Shape b = broadcast_shapes(in[0].shape(), shape_, "copy");
  KILN_CHECK(b == shape_, "copy", "source of shape {} cannot be broadcast to {}", shape_str(in[0].shape()), shape_str(shape_));
  return {{shape_, dtype_, device_}};
}
Device Copy::kernel_device(const std::vector<Tensor>& in, const std::vector<TensorMeta>&) const {
  return in[0].device().is_cuda() ? in[0].device() : device_;
}
std::vector<Tensor> Copy::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                              const std::vector<bool>&) const {
  Tensor g = cot[0];
  if (g.device() != src_device_) g = to_device(g, src_device_);
  if (g.dtype() != src_dtype_) g = cast(g, src_dtype_);
  return {g};
}

std::vector<TensorMeta> Fill::infer(const std::vector<Tensor>&) const { return {{shape_, dtype_, device_}}; }

std::vector<TensorMeta> Cat::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(!in.empty(), "cat", "needs at least one tensor");
  const Tensor& a = in[0];
  Shape s = a.shape();
  s[static_cast<size_t>(dim_)] = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const Tensor& t = in[i];
    KILN_CHECK(t.dtype() == a.dtype(), "cat", "dtype mismatch: tensor 0 is {}, tensor {} is {}", dtype_name(a.dtype()), i,
               dtype_name(t.dtype()));
    KILN_CHECK(t.dim() == a.dim(), "cat", "tensor 0 has shape {}, tensor {} has shape {}", shape_str(a.shape()), i,
               shape_str(t.shape()));
    for (int64_t d = 0; d < a.dim(); ++d) {
      KILN_CHECK(d == dim_ || t.shape()[static_cast<size_t>(d)] == a.shape()[static_cast<size_t>(d)], "cat",
                 "sizes must match except in dim {}: tensor 0 has shape {}, tensor {} has shape {}", dim_,
                 shape_str(a.shape()), i, shape_str(t.shape()));
    }
    s[static_cast<size_t>(dim_)] += t.shape()[static_cast<size_t>(dim_)];
  }
  return {{s, a.dtype(), a.device()}};
}
std::vector<Tensor> Cat::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                             const std::vector<bool>& wanted) const {
  std::vector<Tensor> out;
  int64_t at = 0;
  for (size_t i = 0; i < sizes_.size(); ++i) {
    out.push_back(wanted[i] ? narrow(cot[0], dim_, at, sizes_[i]) : Tensor());
    at += sizes_[i];
  }
  return out;
}

std::vector<TensorMeta> SliceBackward::infer(const std::vector<Tensor>& in) const {
  const Tensor& g = in[0];
  KILN_CHECK(g.dim() == static_cast<int64_t>(in_.size()), "slice_backward", "gradient of shape {} for input {}",
             shape_str(g.shape()), shape_str(in_));
  int64_t n = g.shape()[static_cast<size_t>(dim_)];
  KILN_CHECK(n == 0 || start_ + (n - 1) * step_ < in_[static_cast<size_t>(dim_)], "slice_backward",
             "slice of {} elements from {} by {} does not fit {}", n, start_, step_, shape_str(in_));
  return {{in_, g.dtype(), g.device()}};
}
std::vector<Tensor> SliceBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                                       const std::vector<bool>&) const {
  int64_t n = in_[static_cast<size_t>(dim_)];
  return {slice(cot[0], dim_, start_, n, step_)};
}

}  // namespace prim

namespace {
PrimitivePtr copy_op(const Tensor& x, const Shape& shape, DType dtype, Device device) {
  return std::make_shared<const prim::Copy>(shape, dtype, device, x.dtype(), x.device());
}
}  // namespace

Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  return dispatch1(copy_op(x, x.shape(), x.dtype(), x.device()), {x});
}

Tensor cast(const Tensor& x, DType dtype) {
  if (x.dtype() == dtype) return x;
  return dispatch1(copy_op(x, x.shape(), dtype, x.device()), {x});
}

Tensor to_device(const Tensor& x, Device device) {
  if (x.device() == device) return x;
  return dispatch1(copy_op(x, x.shape(), x.dtype(), device), {x});
}

void copy_(const Tensor& dst, const Tensor& src) {
  std::vector<Tensor> out{dst};
  dispatch_into(copy_op(src, dst.shape(), dst.dtype(), dst.device()), {src}, out);
}

void fill_(const Tensor& dst, double value) {
  std::vector<Tensor> out{dst};
  dispatch_into(std::make_shared<const prim::Fill>(dst.shape(), dst.dtype(), dst.device(), value), {}, out);
}

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  KILN_CHECK(!xs.empty(), "cat", "needs at least one tensor");
  KILN_CHECK(xs[0].dim() > 0, "cat", "cannot concatenate 0-d tensors; unsqueeze them or use stack");
  dim = wrap_dim(dim, xs[0].dim(), "cat");
  if (xs.size() == 1) return xs[0];
  auto op = std::make_shared<prim::Cat>(dim);
  std::vector<int64_t> sizes;
  for (const Tensor& t : xs) sizes.push_back(t.defined() && t.dim() > dim ? t.shape()[static_cast<size_t>(dim)] : 0);
  op->set_sizes(sizes);
  return dispatch1(op, xs);
}

Tensor slice_backward(const Tensor& grad, const Shape& input_shape, int64_t dim, int64_t start, int64_t step) {
  return dispatch1(std::make_shared<const prim::SliceBackward>(input_shape, dim, start, step), {grad});
}

}  // namespace kiln

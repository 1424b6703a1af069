// The reductions of core/ops.h (sum, mean, amax, amin, argmax, logsumexp, softmax, log_softmax):
// their public functions, shape/dtype rules and vjps, which are written with other public ops.
#include "core/ops/reduce.h"

#include <limits>

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {
namespace {

// Sorted, unique, non-negative reduced dims; empty `dims` means all. A 0-d tensor reduces nothing
// (dims 0 and -1 name the scalar itself, as in PyTorch).
std::vector<int64_t> reduce_dims(const Tensor& x, const std::vector<int64_t>& dims, const char* op) {
  std::vector<int64_t> out = normalize_dims(dims, x.dim(), op);
  if (x.dim() == 0) out.clear();
  return out;
}

// `in` with the reduced dims set to 1 (the keepdim shape).
Shape keep_shape(const Shape& in, const std::vector<int64_t>& dims) {
  Shape out = in;
  for (int64_t d : dims) out[static_cast<size_t>(d)] = 1;
  return out;
}

Shape reduced_shape(const Shape& in, const std::vector<int64_t>& dims, bool keepdim) {
  if (keepdim) return keep_shape(in, dims);
  Shape out;
  size_t k = 0;
  for (size_t d = 0; d < in.size(); ++d) {
    if (k < dims.size() && dims[k] == static_cast<int64_t>(d)) {
      ++k;
      continue;
    }
    out.push_back(in[d]);
  }
  return out;
}

void check_one_input(const std::vector<Tensor>& inputs, const char* op) {
  KILN_CHECK(inputs.size() == 1, op, "expected 1 input, found {}", inputs.size());
}

void check_dims(const Tensor& x, const std::vector<int64_t>& dims, const char* op) {
  for (int64_t d : dims) {
    KILN_CHECK(d >= 0 && d < x.dim(), op, "dim {} out of range for a {}-d tensor of shape {}", d, x.dim(),
               shape_str(x.shape()));
  }
}

void check_floating(const Tensor& x, const char* op) {
  KILN_CHECK(is_floating(x.dtype()), op, "expected a floating-point tensor, found dtype {}", dtype_name(x.dtype()));
}

Tensor reduce(prim::ReduceKind kind, const char* op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  std::vector<int64_t> d = reduce_dims(x, dims, op);
  return dispatch1(std::make_shared<const prim::Reduce>(kind, std::move(d), keepdim, x.shape()), {x});
}

}  // namespace

// ---- public functions

Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce(prim::ReduceKind::sum, "sum", x, dims, keepdim);
}

Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce(prim::ReduceKind::mean, "mean", x, dims, keepdim);
}

Tensor amax(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce(prim::ReduceKind::max, "amax", x, dims, keepdim);
}

Tensor amin(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce(prim::ReduceKind::min, "amin", x, dims, keepdim);
}

Tensor argmax(const Tensor& x, int64_t dim, bool keepdim) {
  return dispatch1(std::make_shared<const prim::ArgMax>(wrap_dim(dim, x.dim(), "argmax"), keepdim), {x});
}

Tensor logsumexp(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  std::vector<int64_t> d = reduce_dims(x, dims, "logsumexp");
  return dispatch1(std::make_shared<const prim::LogSumExp>(std::move(d), keepdim), {x});
}

Tensor softmax(const Tensor& x, int64_t dim) {
  return dispatch1(std::make_shared<const prim::Softmax>(wrap_dim(dim, x.dim(), "softmax"), false), {x});
}

Tensor log_softmax(const Tensor& x, int64_t dim) {
  return dispatch1(std::make_shared<const prim::Softmax>(wrap_dim(dim, x.dim(), "log_softmax"), true), {x});
}

namespace prim {

// ---- Reduce

Reduce::Reduce(ReduceKind kind, std::vector<int64_t> dims, bool keepdim, Shape in_shape)
    : kind_(kind), dims_(std::move(dims)), keepdim_(keepdim), in_shape_(std::move(in_shape)) {}

const char* Reduce::name() const {
  switch (kind_) {
    case ReduceKind::sum: return "sum";
    case ReduceKind::mean: return "mean";
    case ReduceKind::max: return "amax";
    case ReduceKind::min: break;
  }
  return "amin";
}

std::vector<TensorMeta> Reduce::infer(const std::vector<Tensor>& inputs) const {
  check_one_input(inputs, name());
  const Tensor& x = inputs[0];
  check_dims(x, dims_, name());
  DType out = x.dtype();
  if (kind_ == ReduceKind::sum && !is_floating(out)) out = DType::i64;
  if (kind_ == ReduceKind::mean) check_floating(x, name());
  if (kind_ == ReduceKind::max || kind_ == ReduceKind::min) {
    int64_t count = 1;
    for (int64_t d : dims_) count *= x.shape()[static_cast<size_t>(d)];
    KILN_CHECK(count > 0, name(), "expected a non-empty reduction, found shape {} reduced over dims [{}]",
               shape_str(x.shape()), fmt::join(dims_, ", "));
  }
  return {{reduced_shape(x.shape(), dims_, keepdim_), out, x.device()}};
}

std::vector<Tensor> Reduce::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor()};
  const Shape keep = keep_shape(in_shape_, dims_);
  Tensor g = reshape(cotangents[0], keep);  // (keep)
  switch (kind_) {
    case ReduceKind::sum: return {expand(g, in_shape_)};
    case ReduceKind::mean: {
      int64_t n = 1;
      for (int64_t d : dims_) n *= in_shape_[static_cast<size_t>(d)];
      return {expand(mul(g, 1.0 / static_cast<double>(n)), in_shape_)};
    }
    case ReduceKind::max:
    case ReduceKind::min: break;
  }
  // The gradient is shared evenly by the elements equal to the extremum.
  const Tensor& x = inputs[0];                                // (in)
  Tensor hit = cast(eq(x, reshape(outputs[0], keep)), x.dtype());  // (in) 1 where x is the extremum
  Tensor count = sum(hit, dims_, true);                       // (keep)
  return {mul(hit, div(g, count))};
}

// ---- ArgMax

std::vector<TensorMeta> ArgMax::infer(const std::vector<Tensor>& inputs) const {
  check_one_input(inputs, "argmax");
  const Tensor& x = inputs[0];
  if (x.dim() == 0) return {{Shape{}, DType::i64, x.device()}};
  check_dims(x, {dim_}, "argmax");
  KILN_CHECK(x.size(dim_) > 0, "argmax", "expected a non-empty dim {}, found shape {}", dim_, shape_str(x.shape()));
  return {{reduced_shape(x.shape(), {dim_}, keepdim_), DType::i64, x.device()}};
}

// ---- LogSumExp

std::vector<TensorMeta> LogSumExp::infer(const std::vector<Tensor>& inputs) const {
  check_one_input(inputs, "logsumexp");
  const Tensor& x = inputs[0];
  check_dims(x, dims_, "logsumexp");
  check_floating(x, "logsumexp");
  return {{reduced_shape(x.shape(), dims_, keepdim_), x.dtype(), x.device()}};
}

std::vector<Tensor> LogSumExp::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                   const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor()};
  const Tensor& x = inputs[0];  // (in)
  const Shape keep = keep_shape(x.shape(), dims_);
  Tensor out = reshape(outputs[0], keep);  // (keep)
  Tensor g = reshape(cotangents[0], keep);  // (keep)
  // exp(x - out) is the softmax of x; where out = -inf every x is -inf too, and subtracting 0
  // instead gives exp(-inf) = 0 rather than exp(NaN).
  Tensor shift = where(eq(out, -std::numeric_limits<double>::infinity()), zeros_like(out), out);
  return {mul(g, exp(sub(x, shift)))};
}

// ---- Softmax

std::vector<TensorMeta> Softmax::infer(const std::vector<Tensor>& inputs) const {
  check_one_input(inputs, name());
  const Tensor& x = inputs[0];
  if (x.dim() > 0) check_dims(x, {dim_}, name());
  check_floating(x, name());
  return {{x.shape(), x.dtype(), x.device()}};
}

std::vector<Tensor> Softmax::vjp(const std::vector<Tensor>&, const std::vector<Tensor>& outputs,
                                 const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor()};
  const Tensor& y = outputs[0];     // (in)
  const Tensor& g = cotangents[0];  // (in)
  if (log_) return {sub(g, mul(exp(y), sum(g, {dim_}, true)))};
  return {mul(y, sub(g, sum(mul(g, y), {dim_}, true)))};
}

}  // namespace prim
}  // namespace kiln

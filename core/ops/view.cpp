// View and shape ops: reshape/view, permute/transpose, slice/narrow/select, expand, squeeze,
// flatten, split/chunk, and sum_to (the reverse of broadcasting).
#include "core/ops/view.h"

#include <algorithm>
#include <numeric>

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {
namespace {

Tensor alias(const Tensor& x, Shape shape, Shape strides, int64_t offset) {
  auto t = std::make_shared<TensorImpl>();
  const TensorImpl& s = x.impl_ref();
  t->storage = s.storage;
  t->offset = offset;
  t->shape = std::move(shape);
  t->strides = std::move(strides);
  t->dtype = s.dtype;
  t->device = s.device;
  return Tensor(t);
}

// Strides that let `shape` view memory laid out as (old_shape, old_strides), if any (PyTorch's rule:
// each run of dims that is contiguous in memory may be split or merged).
bool view_strides(const Shape& old_shape, const Shape& old_strides, const Shape& shape, Shape& strides) {
  strides.assign(shape.size(), 1);
  if (numel(old_shape) == 0 || old_shape.empty()) {
    strides = contiguous_strides(shape);
    return true;
  }
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_base = old_strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(old_shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= old_shape[static_cast<size_t>(d)];
    if (d == 0 || (old_shape[static_cast<size_t>(d - 1)] != 1 &&
                   old_strides[static_cast<size_t>(d - 1)] != tensor_numel * chunk_base)) {
      while (view_d >= 0 && (view_numel < tensor_numel || shape[static_cast<size_t>(view_d)] == 1)) {
        strides[static_cast<size_t>(view_d)] = view_numel * chunk_base;
        view_numel *= shape[static_cast<size_t>(view_d)];
        --view_d;
      }
      if (view_numel != tensor_numel) return false;
      if (d > 0) {
        chunk_base = old_strides[static_cast<size_t>(d - 1)];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  return view_d == -1;
}

// Resolves one -1 and checks the element count.
Shape infer_shape(const Shape& x, const Shape& want, const char* op) {
  Shape out = want;
  int64_t known = 1, free_dim = -1;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] == -1) {
      KILN_CHECK(free_dim < 0, op, "only one dimension can be -1, got {}", shape_str(want));
      free_dim = static_cast<int64_t>(i);
    } else {
      KILN_CHECK(out[i] >= 0, op, "invalid shape {}", shape_str(want));
      known *= out[i];
    }
  }
  int64_t n = numel(x);
  if (free_dim >= 0) {
    KILN_CHECK(known != 0 && n % known == 0, op, "shape {} is invalid for {} elements of shape {}", shape_str(want), n,
               shape_str(x));
    out[static_cast<size_t>(free_dim)] = n / known;
  }
  KILN_CHECK(numel(out) == n, op, "shape {} is invalid for {} elements of shape {}", shape_str(want), n, shape_str(x));
  return out;
}

std::vector<Tensor> one(Tensor t) { return {std::move(t)}; }

}  // namespace

namespace prim {

std::vector<TensorMeta> View::infer(const std::vector<Tensor>& in) const { return {{out_, in[0].dtype(), in[0].device()}}; }
Tensor View::make_view(const std::vector<Tensor>& in) const {
  const Tensor& x = in[0];
  Shape strides;
  KILN_CHECK(view_strides(x.shape(), x.strides(), out_, strides), "view",
             "cannot view a tensor of shape {} with strides {} as {}; use reshape (which copies)", shape_str(x.shape()),
             shape_str(x.strides()), shape_str(out_));
  return alias(x, out_, strides, x.offset());
}
std::vector<Tensor> View::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                              const std::vector<bool>&) const {
  return one(reshape(cot[0], in_));
}

std::vector<TensorMeta> Permute::infer(const std::vector<Tensor>& in) const {
  Shape s;
  for (int64_t d : dims_) s.push_back(in[0].shape()[static_cast<size_t>(d)]);
  return {{s, in[0].dtype(), in[0].device()}};
}
Tensor Permute::make_view(const std::vector<Tensor>& in) const {
  const Tensor& x = in[0];
  Shape s, st;
  for (int64_t d : dims_) {
    s.push_back(x.shape()[static_cast<size_t>(d)]);
    st.push_back(x.strides()[static_cast<size_t>(d)]);
  }
  return alias(x, s, st, x.offset());
}
std::vector<Tensor> Permute::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                                 const std::vector<bool>&) const {
  std::vector<int64_t> inv(dims_.size());
  for (size_t i = 0; i < dims_.size(); ++i) inv[static_cast<size_t>(dims_[i])] = static_cast<int64_t>(i);
  return one(permute(cot[0], inv));
}

std::vector<TensorMeta> Slice::infer(const std::vector<Tensor>& in) const {
  Shape s = in[0].shape();
  s[static_cast<size_t>(dim_)] = length();
  return {{s, in[0].dtype(), in[0].device()}};
}
Tensor Slice::make_view(const std::vector<Tensor>& in) const {
  const Tensor& x = in[0];
  Shape s = x.shape(), st = x.strides();
  size_t d = static_cast<size_t>(dim_);
  int64_t offset = x.offset() + (length() > 0 ? start_ * st[d] : 0);
  s[d] = length();
  st[d] *= step_;
  return alias(x, s, st, offset);
}
std::vector<Tensor> Slice::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                               const std::vector<bool>&) const {
  return one(slice_backward(cot[0], in_, dim_, start_, step_));
}

std::vector<TensorMeta> Expand::infer(const std::vector<Tensor>& in) const { return {{out_, in[0].dtype(), in[0].device()}}; }
Tensor Expand::make_view(const std::vector<Tensor>& in) const {
  const Tensor& x = in[0];
  Shape st(out_.size(), 0);
  size_t lead = out_.size() - x.shape().size();
  for (size_t i = 0; i < x.shape().size(); ++i) st[lead + i] = x.shape()[i] == 1 ? 0 : x.strides()[i];
  return alias(x, out_, st, x.offset());
}
std::vector<Tensor> Expand::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                                const std::vector<bool>&) const {
  return one(sum_to(cot[0], in_));
}

}  // namespace prim

Tensor view(const Tensor& x, const Shape& shape) {
  Shape s = infer_shape(x.shape(), shape, "view");
  return dispatch1(std::make_shared<const prim::View>(x.shape(), s), {x});
}

Tensor reshape(const Tensor& x, const Shape& shape) {
  Shape s = infer_shape(x.shape(), shape, "reshape");
  Shape strides;
  if (s == x.shape()) return x;
  if (view_strides(x.shape(), x.strides(), s, strides)) return dispatch1(std::make_shared<const prim::View>(x.shape(), s), {x});
  return view(contiguous(x), s);
}

Tensor permute(const Tensor& x, const std::vector<int64_t>& dims) {
  KILN_CHECK(static_cast<int64_t>(dims.size()) == x.dim(), "permute", "got {} dims for a {}-d tensor", dims.size(), x.dim());
  std::vector<int64_t> d;
  for (int64_t v : dims) d.push_back(wrap_dim(v, x.dim(), "permute"));
  std::vector<int64_t> sorted = d;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i)
    KILN_CHECK(sorted[i] == static_cast<int64_t>(i), "permute", "({}) is not a permutation", fmt::join(dims, ", "));
  return dispatch1(std::make_shared<const prim::Permute>(d), {x});
}

Tensor transpose(const Tensor& x, int64_t d0, int64_t d1) {
  d0 = wrap_dim(d0, x.dim(), "transpose");
  d1 = wrap_dim(d1, x.dim(), "transpose");
  std::vector<int64_t> p(static_cast<size_t>(x.dim()));
  std::iota(p.begin(), p.end(), 0);
  std::swap(p[static_cast<size_t>(d0)], p[static_cast<size_t>(d1)]);
  return permute(x, p);
}

Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end, int64_t step) {
  KILN_CHECK(x.dim() > 0, "slice", "cannot slice a 0-d tensor");
  dim = wrap_dim(dim, x.dim(), "slice");
  KILN_CHECK(step >= 1, "slice", "step must be positive, got {}", step);
  int64_t n = x.shape()[static_cast<size_t>(dim)];
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  return dispatch1(std::make_shared<const prim::Slice>(x.shape(), dim, start, end, step), {x});
}

Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  KILN_CHECK(x.dim() > 0, "narrow", "cannot narrow a 0-d tensor");
  dim = wrap_dim(dim, x.dim(), "narrow");
  int64_t n = x.shape()[static_cast<size_t>(dim)];
  if (start < 0) start += n;
  KILN_CHECK(start >= 0 && length >= 0 && start + length <= n, "narrow",
             "range [{}, {}) out of bounds for dim {} of size {}", start, start + length, dim, n);
  return dispatch1(std::make_shared<const prim::Slice>(x.shape(), dim, start, start + length, 1), {x});
}

Tensor select(const Tensor& x, int64_t dim, int64_t index) {
  KILN_CHECK(x.dim() > 0, "select", "cannot select from a 0-d tensor");
  dim = wrap_dim(dim, x.dim(), "select");
  int64_t n = x.shape()[static_cast<size_t>(dim)];
  KILN_CHECK(index >= -n && index < n, "select", "index {} out of range for dim {} of size {}", index, dim, n);
  if (index < 0) index += n;
  return squeeze(narrow(x, dim, index, 1), dim);
}

Tensor expand(const Tensor& x, const Shape& shape) {
  KILN_CHECK(shape.size() >= x.shape().size(), "expand", "cannot expand {} to fewer dims {}", shape_str(x.shape()),
             shape_str(shape));
  Shape out = shape;
  size_t lead = shape.size() - x.shape().size();
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i < lead) {
      KILN_CHECK(shape[i] >= 0, "expand", "invalid new leading size {} in {}", shape[i], shape_str(shape));
      continue;
    }
    int64_t have = x.shape()[i - lead];
    if (shape[i] == -1) out[i] = have;
    KILN_CHECK(out[i] == have || have == 1, "expand", "cannot expand {} to {}: dim {} has size {}, not 1",
               shape_str(x.shape()), shape_str(shape), i - lead, have);
  }
  if (out == x.shape()) return x;
  return dispatch1(std::make_shared<const prim::Expand>(x.shape(), out), {x});
}

Tensor broadcast_to(const Tensor& x, const Shape& shape) { return expand(x, shape); }

Tensor unsqueeze(const Tensor& x, int64_t dim) {
  dim = wrap_dim(dim, x.dim() + 1, "unsqueeze");
  Shape s = x.shape();
  s.insert(s.begin() + dim, 1);
  return view(x, s);
}

Tensor squeeze(const Tensor& x, int64_t dim) {
  dim = wrap_dim(dim, x.dim(), "squeeze");
  if (x.dim() == 0 || x.shape()[static_cast<size_t>(dim)] != 1) return x;
  Shape s = x.shape();
  s.erase(s.begin() + dim);
  return view(x, s);
}

Tensor flatten(const Tensor& x, int64_t start, int64_t end) {
  if (x.dim() == 0) return reshape(x, {1});
  start = wrap_dim(start, x.dim(), "flatten");
  end = wrap_dim(end, x.dim(), "flatten");
  KILN_CHECK(start <= end, "flatten", "start dim {} is after end dim {}", start, end);
  Shape s(x.shape().begin(), x.shape().begin() + start);
  int64_t m = 1;
  for (int64_t d = start; d <= end; ++d) m *= x.shape()[static_cast<size_t>(d)];
  s.push_back(m);
  s.insert(s.end(), x.shape().begin() + end + 1, x.shape().end());
  return reshape(x, s);
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  dim = wrap_dim(dim, x.dim(), "split");
  int64_t n = x.shape()[static_cast<size_t>(dim)], total = 0;
  for (int64_t s : sizes) {
    KILN_CHECK(s >= 0, "split", "negative split size {}", s);
    total += s;
  }
  KILN_CHECK(total == n, "split", "sizes ({}) add up to {}, but dim {} has size {}", fmt::join(sizes, ", "), total, dim, n);
  std::vector<Tensor> out;
  int64_t at = 0;
  for (int64_t s : sizes) {
    out.push_back(narrow(x, dim, at, s));
    at += s;
  }
  return out;
}

std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim) {
  KILN_CHECK(split_size > 0, "split", "split size must be positive, got {}", split_size);
  dim = wrap_dim(dim, x.dim(), "split");
  int64_t n = x.shape()[static_cast<size_t>(dim)];
  std::vector<int64_t> sizes;
  for (int64_t at = 0; at < n; at += split_size) sizes.push_back(std::min(split_size, n - at));
  if (sizes.empty()) sizes.push_back(0);
  return split(x, sizes, dim);
}

std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim) {
  KILN_CHECK(chunks > 0, "chunk", "number of chunks must be positive, got {}", chunks);
  dim = wrap_dim(dim, x.dim(), "chunk");
  int64_t n = x.shape()[static_cast<size_t>(dim)];
  return split(x, std::max<int64_t>(1, (n + chunks - 1) / chunks), dim);
}

Tensor stack(const std::vector<Tensor>& xs, int64_t dim) {
  KILN_CHECK(!xs.empty(), "stack", "needs at least one tensor");
  dim = wrap_dim(dim, xs[0].dim() + 1, "stack");
  std::vector<Tensor> u;
  for (const Tensor& t : xs) {
    KILN_CHECK(t.shape() == xs[0].shape(), "stack", "all tensors need one shape, got {} and {}", shape_str(xs[0].shape()),
               shape_str(t.shape()));
    u.push_back(unsqueeze(t, dim));
  }
  return cat(u, dim);
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  KILN_CHECK(x.shape().size() >= shape.size(), "sum_to", "cannot sum {} down to {}", shape_str(x.shape()), shape_str(shape));
  size_t lead = x.shape().size() - shape.size();
  std::vector<int64_t> dims;
  for (size_t i = 0; i < x.shape().size(); ++i) {
    if (i < lead) { dims.push_back(static_cast<int64_t>(i)); continue; }
    if (shape[i - lead] == 1 && x.shape()[i] != 1) dims.push_back(static_cast<int64_t>(i));
    else KILN_CHECK(shape[i - lead] == x.shape()[i], "sum_to", "cannot sum {} down to {}", shape_str(x.shape()), shape_str(shape));
  }
  Tensor s = dims.empty() ? x : sum(x, dims, true);
  return reshape(s, shape);
}

}  // namespace kiln

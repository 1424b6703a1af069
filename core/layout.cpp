// Broadcast strides (whole shapes and matmul batch dims) and dim coalescing.
#include "core/layout.h"

namespace kiln {

Shape broadcast_strides(const Tensor& t, const Shape& target) {
  const Shape& s = t.shape();
  const Shape& st = t.strides();
  KILN_CHECK(s.size() <= target.size(), "broadcast", "cannot broadcast {} to {}", shape_str(s), shape_str(target));
  Shape out(target.size(), 0);
  size_t lead = target.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i) {
    KILN_CHECK(s[i] == target[lead + i] || s[i] == 1, "broadcast", "cannot broadcast {} to {}", shape_str(s), shape_str(target));
    out[lead + i] = s[i] == 1 ? 0 : st[i];
  }
  return out;
}

Shape batch_strides(const Tensor& t, const Shape& batch) {
  Shape out(batch.size(), 0);
  const size_t nb = t.shape().size() - 2;
  const size_t lead = batch.size() - nb;
  for (size_t i = 0; i < nb; ++i) out[lead + i] = t.shape()[i] == 1 ? 0 : t.strides()[i];
  return out;
}

void coalesce_dims(Shape& shape, std::vector<Shape>& strides) {
  const size_t n = strides.size();
  Shape out_shape;
  std::vector<Shape> out_strides(n);
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    bool merge = !out_shape.empty();
    for (size_t k = 0; k < n && merge; ++k) merge = out_strides[k].back() == strides[k][d] * shape[d];
    if (merge) {
      out_shape.back() *= shape[d];
      for (size_t k = 0; k < n; ++k) out_strides[k].back() = strides[k][d];
    } else {
      out_shape.push_back(shape[d]);
      for (size_t k = 0; k < n; ++k) out_strides[k].push_back(strides[k][d]);
    }
  }
  if (out_shape.empty()) {
    out_shape.push_back(numel(shape) == 0 ? 0 : 1);
    for (size_t k = 0; k < n; ++k) out_strides[k].push_back(0);
  }
  shape = std::move(out_shape);
  strides = std::move(out_strides);
}

}  // namespace kiln

// Layout helpers shared by the backends: strides of a tensor broadcast to a shape (or, for matmul, of
// its batch dims), and merging of dims that are contiguous for every operand (so a contiguous tensor
// is one flat run).
#pragma once
#include <vector>

#include "core/tensor.h"

namespace kiln {

// Strides of `t` seen as a tensor of shape `target` (missing and size-1 dims get stride 0).
Shape broadcast_strides(const Tensor& t, const Shape& target);

// Strides of the batch dims of `t` (all but its last two) under the output batch shape `batch`:
// missing or size-1 dims broadcast with stride 0.
Shape batch_strides(const Tensor& t, const Shape& batch);

// Drops size-1 dims of `shape` and merges neighbours that are contiguous for every stride set in
// `strides` (one per operand, each of shape.size()). The result has at least one dim.
void coalesce_dims(Shape& shape, std::vector<Shape>& strides);

}  // namespace kiln

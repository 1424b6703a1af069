// Shapes and strides (in elements), and the helpers every op uses to check and derive them:
// numel, contiguous strides, dimension wrapping, broadcasting.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& s);
Shape contiguous_strides(const Shape& s);
std::string shape_str(const Shape& s);  // "(4, 8)"
// Wraps a possibly negative dim into [0, ndim); throws "[op] dim d out of range for a N-d tensor".
int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op);
// Numpy-style broadcast of two shapes; throws "[op] shapes (..) and (..) cannot be broadcast".
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);
// Sorted, unique, wrapped dims; empty `dims` means all dims.
std::vector<int64_t> normalize_dims(const std::vector<int64_t>& dims, int64_t ndim, const char* op);

}  // namespace kiln

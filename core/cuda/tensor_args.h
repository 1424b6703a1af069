// Host-side (g++) helpers that turn Tensors into the plain structs CUDA launchers take: device
// pointers and Strided<N> descriptors with broadcasting and dim merging.
#pragma once
#include <array>

#include "core/cuda/strided.cuh"
#include "core/tensor.h"

namespace kiln::cuda {

// Operand 0 is usually the output; the others broadcast to `shape`. Merges dims contiguous for all
// operands, drops size-1 dims; throws kiln::Error beyond kMaxDims merged dims.
template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<const Tensor*, N>& operands, const char* op);
// The same from explicit strides, one set of shape.size() per operand (e.g. the row dims of a kernel
// that handles the last dim itself).
template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<Shape, N>& strides, const char* op);

// All but the last dim of a shape or stride list: the row dims of a kernel that walks the last dim
// itself (norms, rotary embedding, gathers of rows).
inline Shape lead_of(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

// The current stream of the tensor's device, as a cudaStream_t (void*).
void* stream_of(const Tensor& t);

}  // namespace kiln::cuda

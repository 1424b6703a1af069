// Launchers of the copy family (fmt-free, Tensor-free): strided/broadcast copies with a cast between
// any two dtypes, a vectorised contiguous cast, and fills. Pointers are device pointers at element 0
// of each operand; `stream` is a cudaStream_t. Every launcher returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// dst[offset(0, i)] = convert(src[offset(1, i)]) for the n elements of st.shape (operand 0: dst).
cudaError_t launch_copy_strided(void* dst, DType dst_dtype, const void* src, DType src_dtype, const Strided<2>& st,
                                int64_t n, void* stream);
// dst[i] = convert(src[i]) for i < n, both contiguous (16-byte vectors where the pointers allow).
cudaError_t launch_copy_contiguous(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, void* stream);
// dst[offset(0, i)] = value, where `bits` holds the value already converted to dtype (low bytes).
cudaError_t launch_fill(void* dst, DType dtype, uint64_t bits, const Strided<1>& st, int64_t n, void* stream);

}  // namespace kiln::cuda

// Launchers of the RMSNorm kernels (core/cuda/norm.cu), forward and backward. fmt-free and
// Tensor-free: raw device pointers, element strides, Strided<N> row descriptors and a cudaStream_t
// passed as void*. Float dtypes only (bf16/f16/f32 compute in f32, f64 in f64).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// x rows at `rows` (r rows of d, column stride xs), weight (d) with stride ws -> out (r, d).
cudaError_t launch_rms_norm(DType dt, const void* x, const Strided<1>& rows, int64_t xs, const void* w, int64_t ws,
                            int64_t r, int64_t d, double eps, void* out, void* stream);

// Bytes of scratch (f32/f64 per-block partial sums of dw) for r rows of d.
size_t rms_norm_backward_workspace(DType dt, int64_t r, int64_t d);
// rows: operand 0 = x, 1 = g; addend (r, d) contiguous or null -> dx (r, d) (+ addend), dw (d). dw is
// reduced deterministically: fixed chunks of rows per block write partial sums, a second kernel adds
// the partials in chunk order.
cudaError_t launch_rms_norm_backward(DType dt, const void* x, const void* g, const Strided<2>& rows, int64_t xs,
                                     int64_t gs, const void* w, int64_t ws, int64_t r, int64_t d, double eps,
                                     const void* addend, void* dx, void* dw, void* workspace, void* stream);

}  // namespace kiln::cuda

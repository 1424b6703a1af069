// Launcher of the rotary-embedding kernel (core/cuda/rope.cu). fmt-free and Tensor-free: raw device
// pointers, element strides, Strided<3> row descriptors and a cudaStream_t passed as void*. Float
// dtypes only (bf16/f16/f32 compute in f32, f64 in f64).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// r rows of x (d = 2h, column stride xs); rows operand 0 = x, 1 = cos, 2 = sin (tables have h
// columns with strides cs, ss). table_dt is x's dtype or f32. -> out (r, 2h).
cudaError_t launch_rotary(DType dt, DType table_dt, const void* x, const void* cos, const void* sin,
                          const Strided<3>& rows, int64_t xs, int64_t cs, int64_t ss, int64_t r, int64_t h, void* out,
                          void* stream);

}  // namespace kiln::cuda

// Launchers of the SwiGLU kernels (core/cuda/activation.cu), forward and backward. fmt-free and
// Tensor-free: raw device pointers, Strided<N> descriptors and a cudaStream_t passed as void*. Float
// dtypes only (bf16/f16/f32 compute in f32, f64 in f64).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// out = silu(gate) * up over n elements. `st` is null when every operand is contiguous,
// otherwise operand 0 = out, 1 = gate, 2 = up.
cudaError_t launch_swiglu(DType dt, const void* gate, const void* up, void* out, int64_t n, const Strided<3>* st,
                          void* stream);
// dgate, dup from (gate, up, g); `st` null when contiguous, else 0 = dgate, 1 = dup, 2 = gate, 3 = up, 4 = g.
cudaError_t launch_swiglu_backward(DType dt, const void* gate, const void* up, const void* g, void* dgate, void* dup,
                                   int64_t n, const Strided<5>* st, void* stream);

}  // namespace kiln::cuda

// Launchers of the elementwise CUDA kernels (fmt-free; core/cuda/elementwise.cu): unary, binary
// (comparisons write bool) and where over raw device pointers. `st` comes from make_strided with the
// output as operand 0 (contiguous same-shape and fully broadcast operands take a 16-byte vector path).
#pragma once
#include <cuda_runtime_api.h>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"
#include "core/functors.h"

namespace kiln::cuda {

// out (n) = op(x), both of `dtype`; st: (out, x).
cudaError_t launch_unary(UnaryOp op, DType dtype, void* out, const void* x, const Strided<2>& st, int64_t n,
                         void* stream);
// out (n) = a op b; a, b of `dtype`, out of `dtype` (bool for comparisons); st: (out, a, b).
cudaError_t launch_binary(BinaryOp op, DType dtype, void* out, const void* a, const void* b, const Strided<3>& st,
                          int64_t n, void* stream);
// out (n) = cond ? a : b; cond bool, a, b, out of `dtype`; st: (out, cond, a, b).
cudaError_t launch_where(DType dtype, void* out, const void* cond, const void* a, const void* b, const Strided<4>& st,
                         int64_t n, void* stream);

}  // namespace kiln::cuda

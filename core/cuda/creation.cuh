// Launchers of the creation family (fmt-free, Tensor-free): arange, the Philox random fills and
// dropout. Outputs are contiguous device buffers; `stream` is a cudaStream_t. The numbers are those
// of the CPU kernels (core/cpu/creation.cpp, recipes in core/philox.h).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// out (n) = convert(start + i * step), with the product and sum rounded separately as on the CPU.
cudaError_t launch_arange(void* out, DType dtype, double start, double step, int64_t n, void* stream);

enum class RandomFill { uniform, normal, integer, keep_mask };  // as prim::RandomKind
// out (n): uniform [0,1) / normal / integers in [low, high) / keep mask (uniform >= p).
cudaError_t launch_random(void* out, DType dtype, RandomFill kind, int64_t n, uint64_t seed, uint64_t offset, int64_t low,
                          int64_t high, double p, void* stream);

// out (n, contiguous) = keep_i ? x * scale : 0, keep_i = uniform_24bit(i) >= p; x read through
// st (x's strides over the row-major order of out); scale as the CPU computes it.
cudaError_t launch_dropout(void* out, const void* x, DType dtype, const Strided<1>& st, int64_t n, double p, double scale,
                           uint64_t seed, uint64_t offset, void* stream);

}  // namespace kiln::cuda

// Strided addressing for CUDA kernels (fmt-free, Tensor-free): up to kMaxDims dims, N operands;
// operand k's element at a row-major linear index of `shape` sits at offset(k, i). Host code builds
// these with make_strided (core/cuda/tensor_args.h), which merges dims contiguous for every operand.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define KILN_CUDA_HD __host__ __device__ __forceinline__
#else
#define KILN_CUDA_HD inline
#endif

namespace kiln::cuda {

constexpr int kMaxDims = 8;

template <int N>
struct Strided {
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[N][kMaxDims] = {};

  // Offsets (in elements) of linear index i for every operand.
  KILN_CUDA_HD void offsets(int64_t i, int64_t (&off)[N]) const {
    for (int k = 0; k < N; ++k) off[k] = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      int64_t s = shape[d];
      int64_t idx = i % s;
      i /= s;
      for (int k = 0; k < N; ++k) off[k] += idx * strides[k][d];
    }
  }
};

}  // namespace kiln::cuda

// Fast element offsets for CUDA kernels (fmt-free, Tensor-free): Indexer<N> is a Strided<N> stored
// innermost dim first, with 32-bit multiply-high division by each dim size when every linear index
// fits in 31 bits (a multiply and a shift instead of a 64-bit division, which the GPU emulates).
#pragma once
#include <cstdint>

#include "core/cuda/strided.cuh"

namespace kiln::cuda {

// n / d for a fixed d in [1, 2^31) and any n < 2^31 (Granlund-Montgomery, as in PyTorch's IntDivider).
struct FastDiv {
  uint32_t d = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while (shift < 32 && (uint64_t{1} << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) / divisor + 1);
  }
  KILN_CUDA_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return (t + n) >> shift;
  }
};

template <int N>
struct Indexer {
  int ndim = 0;
  bool small = true;             // numel < 2^31: the FastDiv path
  int64_t size[kMaxDims] = {};   // innermost first
  FastDiv div[kMaxDims];
  int64_t stride[N][kMaxDims] = {};

  Indexer() = default;
  // `s` over `numel` elements (row-major dims, outermost first, as make_strided builds them).
  Indexer(const Strided<N>& s, int64_t numel) : ndim(s.ndim), small(numel < (int64_t{1} << 31)) {
    for (int j = 0; j < ndim; ++j) {
      const int d = ndim - 1 - j;
      size[j] = s.shape[d];
      if (small && s.shape[d] > 0) div[j] = FastDiv(static_cast<uint32_t>(s.shape[d]));  // size 0: never indexed
      for (int k = 0; k < N; ++k) stride[k][j] = s.strides[k][d];
    }
  }

  // Offsets (elements) of row-major linear index i for every operand.
  KILN_CUDA_HD void offsets(int64_t i, int64_t (&off)[N]) const {
    for (int k = 0; k < N; ++k) off[k] = 0;
    if (small) {
      uint32_t r = static_cast<uint32_t>(i);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < kMaxDims; ++j) {
        if (j == ndim) break;
        const uint32_t q = div[j].div(r);
        const int64_t idx = r - q * static_cast<uint32_t>(size[j]);
        r = q;
        for (int k = 0; k < N; ++k) off[k] += idx * stride[k][j];
      }
      return;
    }
    for (int j = 0; j < ndim; ++j) {
      const int64_t idx = i % size[j];
      i /= size[j];
      for (int k = 0; k < N; ++k) off[k] += idx * stride[k][j];
    }
  }
  // Offset for operand 0 alone.
  KILN_CUDA_HD int64_t offset(int64_t i) const {
    int64_t off[N];
    offsets(i, off);
    return off[0];
  }
};

}  // namespace kiln::cuda

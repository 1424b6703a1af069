// Device helpers of the copy and creation families (fmt-free): launch geometry for grid-stride
// loops and vector loads/stores of up to 16 bytes. Offsets of strided operands come from core/cuda/indexer.cuh.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace kiln::cuda::copy_detail {

inline constexpr int kThreads = 256;

// Blocks for `items` work items: enough to fill every SM (2048 resident threads each), no more;
// the kernels' grid-stride loops cover the rest.
inline unsigned grid_for(int64_t items) {
  static int sms[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  int& sm = sms[dev & 63];
  if (sm == 0) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    sm = v > 0 ? v : 108;
  }
  int64_t blocks = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm) * (2048 / kThreads);
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The unsigned type of B bytes, for one vector access of B in {1, 2, 4, 8, 16}.
template <int B> struct raw_of;
template <> struct raw_of<1> { using type = uint8_t; };
template <> struct raw_of<2> { using type = uint16_t; };
template <> struct raw_of<4> { using type = uint32_t; };
template <> struct raw_of<8> { using type = uint2; };
template <> struct raw_of<16> { using type = uint4; };

// V elements of T in one access at an address aligned to V * sizeof(T) (at most 16 bytes).
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[V]) {
  static_assert(V * sizeof(T) <= 16, "one access of at most 16 bytes");
  using R = typename raw_of<static_cast<int>(V * sizeof(T))>::type;
  const R r = *reinterpret_cast<const R*>(p);
  memcpy(static_cast<void*>(out), &r, sizeof(R));
}

template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[V]) {
  static_assert(V * sizeof(T) <= 16, "one access of at most 16 bytes");
  using R = typename raw_of<static_cast<int>(V * sizeof(T))>::type;
  R r;
  memcpy(&r, static_cast<const void*>(in), sizeof(R));
  *reinterpret_cast<R*>(p) = r;
}

}  // namespace kiln::cuda::copy_detail

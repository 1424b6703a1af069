// 16-byte vector access for memory-bound CUDA kernels (fmt-free): Pack<T, V> is V elements loaded or
// stored as one aligned access; aligned16 tells whether a pointer allows it.
#pragma once
#include <cstdint>

namespace kiln::cuda {

template <class T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

inline __host__ __device__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace kiln::cuda

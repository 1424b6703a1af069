// Launch geometry for CUDA kernels (fmt-free): the multiprocessor count of the current device and
// grid sizes for grid-stride loops, either capped at kMaxGrid blocks or at what fills the GPU once
// (or a few times). Host code; included by the .cu files of core/cuda and quant/cuda.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

namespace kiln::cuda {

inline constexpr int64_t kMaxGrid = int64_t{1} << 20;  // blocks of a grid-stride launch, at most

// Multiprocessors of the current device (queried once per device; 132 if the query fails).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 132;
  int n = counts[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    counts[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks of `threads` threads covering `work` items (one per thread): at least 1, at most
// `max_blocks`; the kernel's grid-stride loop covers the rest.
inline unsigned grid_for(int64_t work, int threads, int64_t max_blocks = kMaxGrid) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < max_blocks ? blocks : max_blocks));
}

// grid_for, capped at `waves` times the blocks every SM holds at once (2048 resident threads each):
// for memory-bound grid-stride kernels, where more blocks only add scheduling.
inline unsigned grid_to_fill(int64_t work, int threads, int waves = 1) {
  return grid_for(work, threads, static_cast<int64_t>(sm_count()) * (2048 / threads) * waves);
}

}  // namespace kiln::cuda

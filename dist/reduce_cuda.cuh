// The local backend's reduce kernel (fmt-free, for nvcc): out[i] = sum or NaN-propagating max over
// up to 64 rank buffers in rank order, accumulated in f32 for bf16 (as the CPU loops do), written to
// every destination buffer.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::dist {

constexpr int kMaxReduceBuffers = 64;

struct ReduceBuffers {
  const void* srcs[kMaxReduceBuffers];
  void* dsts[kMaxReduceBuffers];
  int num_srcs = 0;
  int num_dsts = 0;
};

// dtype: f32, bf16, f64 or i64. Returns the launch's error.
cudaError_t launch_reduce(DType dtype, bool max, const ReduceBuffers& buffers, int64_t count, cudaStream_t stream);

}  // namespace kiln::dist

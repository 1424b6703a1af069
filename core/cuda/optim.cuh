// Launchers of the optimiser family (fmt-free, Tensor-free): the fused multi-tensor AdamW update, L2
// norm and scale. The host fills a table (one entry per tensor: device pointers, sizes, chunk
// offsets, per-tensor scalars), copies it to the device, and one launch walks every chunk of every tensor.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::cuda {

// Elements per chunk (the unit of work of one block); tensors are split into ceil(n / kAdamWChunk).
inline constexpr int64_t kAdamWChunk = 16384;

struct AdamWTensor {
  void* p;              // (n) param, dtype of the launch
  const void* g;        // (n) grad, same dtype
  float* m;             // (n) exp_avg
  float* v;             // (n) exp_avg_sq
  int64_t n;            // elements (> 0)
  int64_t chunk_begin;  // index of this tensor's first chunk in the launch
  float step_size;      // lr / (1 - beta1^t)
  float bc2_sqrt;       // sqrt(1 - beta2^t)
  int32_t vectorized;   // all four pointers aligned for 4-element vector access
  int32_t pad_;
};

struct AdamWScalars {
  float decay;  // 1 - lr * weight_decay
  float w1;     // 1 - beta1
  float b2;     // beta2
  float c2;     // 1 - beta2
  float eps;
};

// Updates the `count` tensors described by `table` (a device array, chunk_begin ascending, n > 0),
// `total_chunks` chunks in all, params of `dtype` (f32, bf16 or f16), in one launch on `stream`.
cudaError_t launch_adamw(const AdamWTensor* table, int count, int64_t total_chunks, DType dtype,
                         const AdamWScalars& s, void* stream);

// One tensor of a multi-tensor norm or scale launch (chunks of kAdamWChunk elements, as for AdamW).
struct MultiTensorEntry {
  void* x;              // (n) data of `dtype`
  int64_t n;            // elements (> 0)
  int64_t chunk_begin;  // index of this tensor's first chunk in the launch
  DType dtype;          // f32, bf16 or f16
  int32_t vectorized;   // x aligned for 4-element vector access
};

// Per-chunk sums of squares of the `count` tensors of `table` (a device array, chunk_begin
// ascending), accumulated in f32, into `partials` (total_chunks f32, device), then their sum, in a
// fixed order, and its square root into *norm (device f32): two launches, deterministic.
cudaError_t launch_multi_tensor_l2_norm(const MultiTensorEntry* table, int count, int64_t total_chunks,
                                        float* partials, float* norm, void* stream);

// x *= scale in place (f32 multiply, rounded once) for the `count` tensors of `table`, one launch.
cudaError_t launch_multi_tensor_scale(const MultiTensorEntry* table, int count, int64_t total_chunks, float scale,
                                      void* stream);

}  // namespace kiln::cuda

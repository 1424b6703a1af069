// CUDA kernels of the fused multi-tensor optimiser ops (AdamW update, L2 norm, scale): grid-stride
// loops over chunks of all tensors (each block finds its tensor by binary search in the table), 4
// elements per thread per iteration with 16-byte (f32) / 8-byte (bf16, f16) vector accesses.
// AdamW and scale roundings match core/cpu/optim.cpp exactly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda/dtype.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/optim.cuh"
#include "core/cuda/pack.cuh"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;

// The CPU kernel's operation order, with every rounding explicit (no contraction by nvcc).
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& s,
                                              float step_size, float bc2_sqrt) {
  p = __fmul_rn(p, s.decay);
  m = __fmaf_rn(s.w1, __fsub_rn(g, m), m);
  v = __fmaf_rn(v, s.b2, __fmul_rn(s.c2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), s.eps);
  p = __fmaf_rn(-step_size, __fdiv_rn(m, denom), p);
}

// The tensor whose chunks include `chunk`: the last entry with chunk_begin <= chunk.
template <class Entry>
__device__ __forceinline__ int find_tensor(const Entry* table, int count, int64_t chunk) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].chunk_begin <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <class T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWTensor* __restrict__ table, int count,
                                                         int64_t total_chunks, AdamWScalars s) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const AdamWTensor t = table[find_tensor(table, count, chunk)];
    const int64_t begin = (chunk - t.chunk_begin) * kAdamWChunk;
    const int64_t len = min(kAdamWChunk, t.n - begin);
    T* p = static_cast<T*>(t.p) + begin;        // (len)
    const T* g = static_cast<const T*>(t.g) + begin;
    float* m = t.m + begin;
    float* v = t.v + begin;
    int64_t scalar_from = 0;
    if (t.vectorized) {
      const int64_t nvec = len / 4;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        float pf[4], gf[4], mf[4], vf[4];
        load_vec<4>(p + 4 * i, pf);
        load_vec<4>(g + 4 * i, gf);
        load_vec<4>(m + 4 * i, mf);
        load_vec<4>(v + 4 * i, vf);
#pragma unroll
        for (int j = 0; j < 4; ++j) adamw_element(pf[j], gf[j], mf[j], vf[j], s, t.step_size, t.bc2_sqrt);
        store_vec<4>(p + 4 * i, pf);
        store_vec<4>(m + 4 * i, mf);
        store_vec<4>(v + 4 * i, vf);
      }
      scalar_from = nvec * 4;
    }
    for (int64_t i = scalar_from + threadIdx.x; i < len; i += kThreads) {
      float pf = to_compute(p[i]);
      float mf = m[i], vf = v[i];
      adamw_element(pf, to_compute(g[i]), mf, vf, s, t.step_size, t.bc2_sqrt);
      p[i] = from_compute<T>(pf);
      m[i] = mf;
      v[i] = vf;
    }
  }
}

template <class T>
cudaError_t launch_typed(const AdamWTensor* table, int count, int64_t total_chunks, const AdamWScalars& s,
                         cudaStream_t stream) {
  adamw_kernel<T><<<grid_for(total_chunks, 1), kThreads, 0, stream>>>(table, count, total_chunks, s);
  return cudaGetLastError();
}

// The sum of `v` over the block (kThreads threads), valid in thread 0; `red` is kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) v += red[w];
  }
  __syncthreads();  // red is reused by the next chunk
  return v;
}

// This thread's share of the sum of squares of x[0, len).
template <class T> __device__ __forceinline__ float thread_sumsq(const T* x, int64_t len, bool vectorized) {
  float acc = 0.0f;
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t nvec = len / 4;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      float xf[4];
      load_vec<4>(x + 4 * i, xf);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc = fmaf(xf[j], xf[j], acc);
    }
    scalar_from = nvec * 4;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < len; i += kThreads) {
    const float v = to_compute(x[i]);
    acc = fmaf(v, v, acc);
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads) l2_partials_kernel(const MultiTensorEntry* __restrict__ table, int count,
                                                               int64_t total_chunks, float* __restrict__ partials) {
  __shared__ float red[kThreads / 32];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const MultiTensorEntry t = table[find_tensor(table, count, chunk)];
    const int64_t begin = (chunk - t.chunk_begin) * kAdamWChunk;
    const int64_t len = min(kAdamWChunk, t.n - begin);
    float acc = 0.0f;
    switch (t.dtype) {
      case DType::bf16: acc = thread_sumsq(static_cast<const __nv_bfloat16*>(t.x) + begin, len, t.vectorized); break;
      case DType::f16: acc = thread_sumsq(static_cast<const __half*>(t.x) + begin, len, t.vectorized); break;
      default: acc = thread_sumsq(static_cast<const float*>(t.x) + begin, len, t.vectorized); break;
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partials[chunk] = acc;
  }
}

// One block: the partials summed in a fixed order, then the square root.
__global__ void __launch_bounds__(kThreads) l2_finish_kernel(const float* __restrict__ partials, int64_t total_chunks,
                                                             float* __restrict__ norm) {
  __shared__ float red[kThreads / 32];
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < total_chunks; i += kThreads) acc += partials[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *norm = sqrtf(acc);
}

template <class T> __device__ __forceinline__ void scale_chunk(T* x, int64_t len, bool vectorized, float s) {
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t nvec = len / 4;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      float xf[4];
      load_vec<4>(x + 4 * i, xf);
#pragma unroll
      for (int j = 0; j < 4; ++j) xf[j] = __fmul_rn(xf[j], s);
      store_vec<4>(x + 4 * i, xf);
    }
    scalar_from = nvec * 4;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < len; i += kThreads) {
    x[i] = from_compute<T>(__fmul_rn(to_compute(x[i]), s));
  }
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const MultiTensorEntry* __restrict__ table, int count,
                                                         int64_t total_chunks, float s) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const MultiTensorEntry t = table[find_tensor(table, count, chunk)];
    const int64_t begin = (chunk - t.chunk_begin) * kAdamWChunk;
    const int64_t len = min(kAdamWChunk, t.n - begin);
    switch (t.dtype) {
      case DType::bf16: scale_chunk(static_cast<__nv_bfloat16*>(t.x) + begin, len, t.vectorized, s); break;
      case DType::f16: scale_chunk(static_cast<__half*>(t.x) + begin, len, t.vectorized, s); break;
      default: scale_chunk(static_cast<float*>(t.x) + begin, len, t.vectorized, s); break;
    }
  }
}

}  // namespace

cudaError_t launch_multi_tensor_l2_norm(const MultiTensorEntry* table, int count, int64_t total_chunks,
                                        float* partials, float* norm, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (count <= 0 || total_chunks <= 0) return cudaMemsetAsync(norm, 0, sizeof(float), st);
  l2_partials_kernel<<<grid_for(total_chunks, 1), kThreads, 0, st>>>(table, count, total_chunks, partials);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  l2_finish_kernel<<<1, kThreads, 0, st>>>(partials, total_chunks, norm);
  return cudaGetLastError();
}

cudaError_t launch_multi_tensor_scale(const MultiTensorEntry* table, int count, int64_t total_chunks, float scale,
                                      void* stream) {
  if (count <= 0 || total_chunks <= 0) return cudaSuccess;
  scale_kernel<<<grid_for(total_chunks, 1), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table, count, total_chunks,
                                                                                          scale);
  return cudaGetLastError();
}

cudaError_t launch_adamw(const AdamWTensor* table, int count, int64_t total_chunks, DType dtype,
                         const AdamWScalars& s, void* stream) {
  if (count <= 0 || total_chunks <= 0) return cudaSuccess;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32: return launch_typed<float>(table, count, total_chunks, s, st);
    case DType::bf16: return launch_typed<__nv_bfloat16>(table, count, total_chunks, s, st);
    case DType::f16: return launch_typed<__half>(table, count, total_chunks, s, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kiln::cuda

// Device helpers shared by the fused-op kernel files (indexing.cu, norm.cu, rope.cu, loss.cu,
// activation.cu): dtype visitors for launchers, 32-bit index math when offsets fit, row alignment and
// row block sizes, and fixed-shape (hence deterministic) block reductions. 16-byte packs come from
// pack.cuh, grid sizes from launch.cuh. fmt-free; included only by .cu files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/dtype.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"
#include "core/cuda/strided.cuh"

namespace kiln::cuda::fused {

constexpr int kThreads = 256;
constexpr int kRowThreads = 512;  // the most threads a row kernel uses (its launch bound)

// exp for the softmax-like kernels: one MUFU.EX2 in f32 (about 2 ulp, results below ~1e-38 flush
// to 0), exact-rounded exp in f64.
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Offsets of linear index i of `st`, computed in Idx (uint32_t where every offset fits: 64-bit
// division is several times slower).
template <class Idx, int N>
__device__ __forceinline__ void offsets_as(const Strided<N>& st, Idx i, Idx (&off)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
  for (int d = st.ndim - 1; d >= 0; --d) {
    const Idx s = static_cast<Idx>(st.shape[d]);
    const Idx q = i / s;
    const Idx idx = i - q * s;
    i = q;
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += idx * static_cast<Idx>(st.strides[k][d]);
  }
}

// True when every offset of `st` (plus `extra` for the columns) and `count` stay below 2^31.
template <int N>
inline bool fits_32bit(const Strided<N>& st, int64_t extra, int64_t count) {
  constexpr int64_t kLimit = int64_t{1} << 31;
  if (count >= kLimit) return false;
  for (int k = 0; k < N; ++k) {
    int64_t top = extra;
    for (int d = 0; d < st.ndim; ++d) top += (st.shape[d] - 1) * (st.strides[k][d] < 0 ? -st.strides[k][d] : st.strides[k][d]);
    if (top >= kLimit) return false;
  }
  return true;
}

// Calls fn(type_tag<T>{}) for a float dtype; cudaErrorInvalidValue otherwise.
template <class Fn>
cudaError_t visit_float(DType d, Fn&& fn) {
  switch (d) {
    case DType::f64: return fn(type_tag<double>{});
    case DType::f32: return fn(type_tag<float>{});
    case DType::bf16: return fn(type_tag<__nv_bfloat16>{});
    case DType::f16: return fn(type_tag<__half>{});
    default: return cudaErrorInvalidValue;
  }
}

template <class Fn>
cudaError_t visit_index(DType d, Fn&& fn) {
  if (d == DType::i64) return fn(type_tag<int64_t>{});
  if (d == DType::i32) return fn(type_tag<int32_t>{});
  return cudaErrorInvalidValue;
}

// Every row start of `rows` (operand k, elements of `bytes`) 16-byte aligned given an aligned base.
template <int N>
inline bool rows_aligned16(const Strided<N>& rows, int k, int64_t bytes) {
  for (int d = 0; d < rows.ndim; ++d) {
    if ((rows.strides[k][d] * bytes) % 16 != 0) return false;
  }
  return true;
}

// Threads per block for rows of `nvec` vectors: a power of two in [32, kRowThreads], about
// `per_thread` vectors each.
inline int row_threads(int64_t nvec, int per_thread) {
  int t = 32;
  while (t < kRowThreads && static_cast<int64_t>(t) * per_thread < nvec) t *= 2;
  return t;
}

// ---- block reductions: fixed shape, so deterministic; `red` holds 32 slots per reduced value and
// every thread gets the result.

template <class C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class C>
__device__ C block_sum(C v, C* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // `red` may still be read from a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  C r = 0;
  for (int i = 0; i < nw; ++i) r += red[i];
  return r;
}

// Two sums with one pair of barriers.
template <class C>
__device__ void block_sum2(C& a, C& b, C* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  a = 0;
  b = 0;
  for (int i = 0; i < nw; ++i) {
    a += red[i];
    b += red[32 + i];
  }
}

// err == nullptr: the caller skipped the check (targets validated elsewhere); nothing is recorded.
__device__ __forceinline__ void record_error(unsigned long long* err, int64_t pos) {
  if (err != nullptr) atomicMin(err, static_cast<unsigned long long>(pos));
}

}  // namespace kiln::cuda::fused

// Creation-family kernels: arange, the Philox random fills and dropout. Each thread draws one
// Philox block and writes the elements that block feeds (4 for 32-bit-word recipes, 2 for 64-bit
// ones, 1 for normal), so the numbers are bit for bit those of core/cpu/creation.cpp.
#include "core/cuda/convert.cuh"
#include "core/cuda/creation.cuh"
#include "core/cuda/indexer.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"
#include "core/philox.h"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;

constexpr double kPi = 3.14159265358979323846;

// Mantissa bits of a uniform draw per dtype (DType order: f64, f32, bf16, f16; ints use 24).
__host__ __device__ constexpr int uniform_bits_of(DType d) {
  return d == DType::f64 ? 53 : d == DType::bf16 ? 8 : d == DType::f16 ? 11 : 24;
}

__device__ __forceinline__ float word_to_uniform(uint32_t w, int bits) {
  return static_cast<float>(w >> (32 - bits)) * (1.0f / static_cast<float>(1u << bits));
}

__device__ __forceinline__ uint64_t join(uint32_t hi, uint32_t lo) { return (static_cast<uint64_t>(hi) << 32) | lo; }

// Writes up to 4 values at out[4b..]; one 4-wide store when the quad is whole and aligned.
template <class T>
__device__ __forceinline__ void store4(T* out, int64_t base, int64_t n, const T (&v)[4], bool aligned) {
  if (aligned && base + 3 < n) {
    Pack<T, 4> q;
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = v[k];
    *reinterpret_cast<Pack<T, 4>*>(out + base) = q;
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (base + k < n) out[base + k] = v[k];
}

template <class T>
__global__ void __launch_bounds__(kThreads) arange_kernel(T* __restrict__ out, double start, double step, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = cast_value<T>(fma(static_cast<double>(i), step, start));  // g++ -march=x86-64-v3 contracts too
}

// uniform (not f64) and keep_mask: element i reads word i%4 of block i/4.
template <class T, bool kMask>
__global__ void __launch_bounds__(kThreads) uniform4_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                                                             int bits, double p, bool aligned) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Block blk = philox::philox4x32(static_cast<uint64_t>(b), offset, seed);
    T v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float u = word_to_uniform(blk.w[k], bits);
      if constexpr (kMask) v[k] = cast_value<T>(static_cast<double>(u) >= p);
      else v[k] = cast_value<T>(u);
    }
    store4(out, 4 * b, n, v, aligned);
  }
}

// uniform f64 and randint: element i reads words 2(i%2), 2(i%2)+1 of block i/2.
template <class T, bool kInteger>
__global__ void __launch_bounds__(kThreads) wide2_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                                                          int64_t low, uint64_t range) {
  const int64_t blocks = (n + 1) / 2;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Block blk = philox::philox4x32(static_cast<uint64_t>(b), offset, seed);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t i = 2 * b + k;
      if (i >= n) break;
      const uint64_t x = join(blk.w[2 * k], blk.w[2 * k + 1]);
      if constexpr (kInteger) out[i] = cast_value<T>(low + static_cast<int64_t>(x % range));
      else out[i] = cast_value<T>(static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0));
    }
  }
}

// normal: all four words of block i, Box-Muller in double.
template <class T>
__global__ void __launch_bounds__(kThreads) normal_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Block blk = philox::philox4x32(static_cast<uint64_t>(i), offset, seed);
    const double u1 = (static_cast<double>(join(blk.w[0], blk.w[1]) >> 11) + 1.0) * 0x1p-53;  // (0, 1]
    const double u2 = static_cast<double>(join(blk.w[2], blk.w[3]) >> 11) * 0x1p-53;          // [0, 1)
    out[i] = cast_value<T>(sqrt(-2.0 * log(u1)) * cos((2.0 * kPi) * u2));
  }
}

// out (n, contiguous) = keep ? x * scale : 0, computed in C (float, or double for f64).
template <class T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(T* __restrict__ out, const T* __restrict__ x, Indexer<1> ix,
                                                            bool x_contiguous, int64_t n, double p, double scale,
                                                            uint64_t seed, uint64_t offset, bool aligned) {
  using C = device_compute_t<T>;
  const C s = static_cast<C>(scale);
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Block blk = philox::philox4x32(static_cast<uint64_t>(b), offset, seed);
    T v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k;
      v[k] = cast_value<T>(0.0);
      if (i < n && static_cast<double>(word_to_uniform(blk.w[k], 24)) >= p) {
        const T xv = x[x_contiguous ? i : ix.offset(i)];
        v[k] = cast_value<T>(static_cast<C>(as_double(xv)) * s);
      }
    }
    store4(out, 4 * b, n, v, aligned);
  }
}

bool aligned_quad(const void* p, size_t itemsize) { return reinterpret_cast<uintptr_t>(p) % (4 * itemsize) == 0; }

}  // namespace

cudaError_t launch_arange(void* out, DType dtype, double start, double step, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    arange_kernel<T><<<grid_to_fill(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<T*>(out), start, step, n);
    return cudaGetLastError();
  });
}

cudaError_t launch_random(void* out, DType dtype, RandomFill kind, int64_t n, uint64_t seed, uint64_t offset, int64_t low,
                          int64_t high, double p, void* stream) {
  if (n == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int bits = uniform_bits_of(dtype);
  return visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(out);
    const bool aligned = aligned_quad(out, sizeof(T));
    switch (kind) {
      case RandomFill::uniform:
        if (bits == 53) wide2_kernel<T, false><<<grid_to_fill((n + 1) / 2, kThreads), kThreads, 0, s>>>(o, n, seed, offset, 0, 1);
        else uniform4_kernel<T, false><<<grid_to_fill((n + 3) / 4, kThreads), kThreads, 0, s>>>(o, n, seed, offset, bits, p, aligned);
        break;
      case RandomFill::normal:
        normal_kernel<T><<<grid_to_fill(n, kThreads), kThreads, 0, s>>>(o, n, seed, offset);
        break;
      case RandomFill::integer:
        wide2_kernel<T, true><<<grid_to_fill((n + 1) / 2, kThreads), kThreads, 0, s>>>(o, n, seed, offset, low,
                                                                           static_cast<uint64_t>(high - low));
        break;
      case RandomFill::keep_mask:
        uniform4_kernel<T, true><<<grid_to_fill((n + 3) / 4, kThreads), kThreads, 0, s>>>(o, n, seed, offset, 24, p, aligned);
        break;
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_dropout(void* out, const void* x, DType dtype, const Strided<1>& st, int64_t n, double p, double scale,
                           uint64_t seed, uint64_t offset, void* stream) {
  if (n == 0) return cudaSuccess;
  const bool x_contiguous = st.ndim == 1 && st.strides[0][0] == 1;
  return visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dropout_kernel<T><<<grid_to_fill((n + 3) / 4, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(out), static_cast<const T*>(x), Indexer<1>(st, n), x_contiguous, n, p, scale, seed, offset,
        aligned_quad(out, sizeof(T)));
    return cudaGetLastError();
  });
}

}  // namespace kiln::cuda

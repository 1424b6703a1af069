// NF4 kernels in bitsandbytes' format: quantise (one warp per block of 64+ weights, bnb's fast-math
// arithmetic so the bytes equal bnb's CUDA output), 8-bit blockwise quantise/dequantise of the absmax,
// and the one-kernel dequantise (16-byte loads of packed codes, scale decoded inline, 16-byte stores).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>

#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"
#include "quant/cuda/nf4.cuh"
#include "quant/nf4_code.h"

namespace kiln::quant::cuda {
namespace {

using kiln::cuda::aligned16;
using kiln::cuda::grid_to_fill;

constexpr int kThreads = 256;

// bnb's NF4 table and the midpoints between neighbouring levels (what its decision tree compares with).
__constant__ float c_levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

// bnb is built with --use_fast_math: 1/x is rcp.approx, and f32 denormals are flushed to zero.
__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float absmax_ftz(float m, float v) {
  float r;
  asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(r));
  return r;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class T> __device__ __forceinline__ float load_f32(const T* p) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(*p);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(*p);
  else return *p;
}

// Number of midpoints below x (NaN -> 0): a 4-step binary search over the 15 midpoints in `mid`.
__device__ __forceinline__ uint32_t nf4_code(const float* mid, float x) {
  uint32_t c = 0;
  if (x > mid[7]) c = 8;
  if (x > mid[c + 3]) c += 4;
  if (x > mid[c + 1]) c += 2;
  if (x > mid[c]) c += 1;
  return c;
}

__device__ __forceinline__ void load_midpoints(float* mid) {
  if (threadIdx.x < 15)
    mid[threadIdx.x] =
        static_cast<float>((static_cast<double>(c_levels[threadIdx.x]) + c_levels[threadIdx.x + 1]) / 2.0);
  __syncthreads();
}

// One warp per block of `bs` weights; each lane takes pairs (2*lane, 2*lane+1) of every 64.
template <class T>
__global__ void nf4_quantize_kernel(const T* __restrict__ w, int64_t n, int64_t bs, int64_t nblocks,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float mid[16];
  load_midpoints(mid);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; b < nblocks; b += warps) {
    const int64_t begin = b * bs;
    float m = -FLT_MAX;
    for (int64_t j = begin + 2 * lane; j < begin + bs; j += 64) {
      const float a = j < n ? load_f32(w + j) : 0.0f;
      const float c = j + 1 < n ? load_f32(w + j + 1) : 0.0f;
      m = absmax_ftz(absmax_ftz(m, a), c);
    }
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float inv = rcp_approx_ftz(m);
    for (int64_t j = begin + 2 * lane; j < begin + bs && j < n; j += 64) {
      const float a = load_f32(w + j);
      const float c = j + 1 < n ? load_f32(w + j + 1) : 0.0f;
      packed[j / 2] = static_cast<uint8_t>((nf4_code(mid, mul_ftz(a, inv)) << 4) | nf4_code(mid, mul_ftz(c, inv)));
    }
  }
}

// One warp per block of `bs` values (x - offset), lanes striding by 32.
__global__ void blockwise8_quantize_kernel(const float* __restrict__ x, int64_t n, float offset,
                                           const float* __restrict__ code_g, int64_t bs, int64_t nblocks,
                                           uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; b < nblocks; b += warps) {
    const int64_t begin = b * bs, end = min(n, begin + bs);
    float m = -FLT_MAX;
    for (int64_t j = begin + lane; j < end; j += 32) m = absmax_ftz(m, __fsub_rn(x[j], offset));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float inv = rcp_approx_ftz(m);
    for (int64_t j = begin + lane; j < end; j += 32) codes[j] = detail::dynamic_code_search(code, mul_ftz(__fsub_rn(x[j], offset), inv));
  }
}

__global__ void blockwise8_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                             const float* __restrict__ code, int64_t n, int64_t bs,
                                             float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __fmul_rn(__ldg(code + codes[i]), __ldg(absmax + i / bs));
  }
}

template <bool kDouble>
__device__ __forceinline__ float block_scale(const NF4Scales& s, int64_t b, int bs_shift, int nbs_shift) {
  if constexpr (kDouble) {
    // bnb: dequantize_blockwise (one f32 multiply) then "+= offset" (one f32 add): never fused.
    return __fadd_rn(__fmul_rn(__ldg(s.nested_code + __ldg(s.absmax_u8 + b)), __ldg(s.nested_absmax + (b >> nbs_shift))),
                     s.offset);
  } else {
    (void)bs_shift;
    (void)nbs_shift;
    return __ldg(s.absmax_f32 + b);
  }
}

// Output element types: one 16-byte piece holds kPerPiece values.
template <class T> struct Out;
template <> struct Out<float> {
  static constexpr int kPerPiece = 4;
  __device__ static float one(float v) { return v; }
};
template <> struct Out<__nv_bfloat16> {
  static constexpr int kPerPiece = 8;
  __device__ static uint32_t two(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __nv_bfloat16 one(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Out<__half> {
  static constexpr int kPerPiece = 8;
  __device__ static uint32_t two(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __half one(float v) { return __float2half_rn(v); }
};

// 16 output bytes from `bits` (the packed codes of kPerPiece weights, first weight in the high nibble
// of the lowest byte) scaled by `scale`.
template <class T>
__device__ __forceinline__ uint4 decode_piece(const float* lut, uint32_t bits, float scale) {
  if constexpr (Out<T>::kPerPiece == 8) {
    uint32_t w[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (bits >> (8 * b)) & 0xffu;
      w[b] = Out<T>::two(__fmul_rn(lut[byte >> 4], scale), __fmul_rn(lut[byte & 0x0fu], scale));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    const uint32_t b0 = bits & 0xffu, b1 = (bits >> 8) & 0xffu;
    return make_uint4(__float_as_uint(__fmul_rn(lut[b0 >> 4], scale)), __float_as_uint(__fmul_rn(lut[b0 & 0x0fu], scale)),
                      __float_as_uint(__fmul_rn(lut[b1 >> 4], scale)), __float_as_uint(__fmul_rn(lut[b1 & 0x0fu], scale)));
  }
}

// kVec: each warp takes kUnroll x 32 chunks of 32 weights per step (lane l loads chunk l of each
// group of 32: coalesced 512-byte reads, all issued before any decoding so several are in flight,
// and decodes their block scales), then writes the warp's outputs as consecutive 16-byte pieces
// (fully coalesced), fetching each piece's codes and scale from the owning lane with shuffles. The
// n % 32 tail (or everything when !kVec: misaligned pointers) goes one weight per thread.
constexpr int kUnroll = 2;

template <class T, bool kDouble, bool kVec>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Scales s, int bs_shift, int nbs_shift,
                                      int64_t n, T* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = c_levels[threadIdx.x];
  __syncthreads();
  constexpr int kPieces = 32 / Out<T>::kPerPiece;  // 16-byte output pieces per chunk of 32 weights
  const int lane = threadIdx.x & 31;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t chunks = kVec ? n / 32 : 0;
  // warp-uniform: base = the warp's first chunk this step (one step per thread with dequantize_typed's grid)
  for (int64_t base = (tid - lane) * kUnroll; base < chunks; base += stride * kUnroll) {
    uint4 cur[kUnroll];
    float cur_scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * 32 + lane;
      cur[u] = make_uint4(0, 0, 0, 0);
      cur_scale[u] = 0.0f;
      if (c < chunks) {
        cur[u] = __ldg(reinterpret_cast<const uint4*>(packed) + c);
        cur_scale[u] = block_scale<kDouble>(s, (c * 32) >> bs_shift, bs_shift, nbs_shift);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t group = base + u * 32;  // first chunk of this group of 32
      uint4* dst = reinterpret_cast<uint4*>(out + group * 32);
#pragma unroll
      for (int j = 0; j < kPieces; ++j) {
        const int p = j * 32 + lane;          // piece of the group's output
        const int src = p / kPieces, sub = p % kPieces;
        const uint32_t x = __shfl_sync(0xffffffffu, cur[u].x, src), y = __shfl_sync(0xffffffffu, cur[u].y, src);
        const uint32_t z = __shfl_sync(0xffffffffu, cur[u].z, src), w = __shfl_sync(0xffffffffu, cur[u].w, src);
        const float sc = __shfl_sync(0xffffffffu, cur_scale[u], src);
        const int word = sub * 4 / kPieces;   // which 4 packed bytes hold the piece
        uint32_t bits = word == 0 ? x : word == 1 ? y : word == 2 ? z : w;
        if constexpr (kPieces == 8) bits >>= 16 * (sub & 1);  // f32: 4 weights = 2 bytes
        // a streaming store (evict first): 92.0% of copy bandwidth at the head's shape on an H100, 91.3% without
        if (group + src < chunks) __stcs(dst + p, decode_piece<T>(lut, bits, sc));
      }
    }
  }
  for (int64_t i = chunks * 32 + tid; i < n; i += stride) {
    const uint8_t byte = packed[i / 2];
    const float scale = block_scale<kDouble>(s, i >> bs_shift, bs_shift, nbs_shift);
    out[i] = Out<T>::one(__fmul_rn(lut[(i & 1) ? (byte & 0x0f) : (byte >> 4)], scale));
  }
}

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

template <class T>
cudaError_t dequantize_typed(const uint8_t* packed, const NF4Scales& s, int64_t n, T* out, cudaStream_t st) {
  const bool vec = aligned16(packed) && aligned16(out);
  const bool dq = s.absmax_u8 != nullptr;
  const int bs = log2_exact(s.blocksize), nbs = log2_exact(s.nested_blocksize);
  // One step per thread (kUnroll chunks, or one weight), every block at once: on an H100 this ran the head's
  // 128256 x 4096 at 96.4% of copy bandwidth and the layers' shapes at 100%, against 92.0% and 98% with a
  // grid of two waves of resident blocks looping (bench/RESULTS.md, eighteenth session).
  const int64_t units = vec ? (n / 32 + kUnroll - 1) / kUnroll + n % 32 : n;
  const int grid = static_cast<int>(std::clamp<int64_t>((units + kThreads - 1) / kThreads, 1, 2147483647));
  if (dq && vec) nf4_dequantize_kernel<T, true, true><<<grid, kThreads, 0, st>>>(packed, s, bs, nbs, n, out);
  else if (dq) nf4_dequantize_kernel<T, true, false><<<grid, kThreads, 0, st>>>(packed, s, bs, nbs, n, out);
  else if (vec) nf4_dequantize_kernel<T, false, true><<<grid, kThreads, 0, st>>>(packed, s, bs, nbs, n, out);
  else nf4_dequantize_kernel<T, false, false><<<grid, kThreads, 0, st>>>(packed, s, bs, nbs, n, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nf4_quantize(DType dt, const void* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                                void* stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int grid = grid_to_fill(nblocks * 32, kThreads, 2);
  auto st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::f32:
      nf4_quantize_kernel<<<grid, kThreads, 0, st>>>(static_cast<const float*>(w), n, blocksize, nblocks, packed, absmax);
      break;
    case DType::bf16:
      nf4_quantize_kernel<<<grid, kThreads, 0, st>>>(static_cast<const __nv_bfloat16*>(w), n, blocksize, nblocks, packed,
                                                     absmax);
      break;
    case DType::f16:
      nf4_quantize_kernel<<<grid, kThreads, 0, st>>>(static_cast<const __half*>(w), n, blocksize, nblocks, packed, absmax);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_blockwise8_quantize(const float* x, int64_t n, float offset, const float* code, int64_t blocksize,
                                       uint8_t* codes, float* absmax, void* stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  blockwise8_quantize_kernel<<<grid_to_fill(nblocks * 32, kThreads, 2), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, offset, code, blocksize, nblocks, codes, absmax);
  return cudaGetLastError();
}

cudaError_t launch_blockwise8_dequantize(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                                         int64_t blocksize, float* out, void* stream) {
  blockwise8_dequantize_kernel<<<grid_to_fill(n, kThreads, 2), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(codes, absmax, code, n,
                                                                                                  blocksize, out);
  return cudaGetLastError();
}

cudaError_t launch_nf4_dequantize(DType out_dt, const uint8_t* packed, const NF4Scales& scales, int64_t n, void* out,
                                  void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (out_dt) {
    case DType::f32: return dequantize_typed(packed, scales, n, static_cast<float*>(out), st);
    case DType::bf16: return dequantize_typed(packed, scales, n, static_cast<__nv_bfloat16*>(out), st);
    case DType::f16: return dequantize_typed(packed, scales, n, static_cast<__half*>(out), st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kiln::quant::cuda

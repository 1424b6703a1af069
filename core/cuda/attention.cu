// Flash attention on CUDA cores for every float dtype: tiles of 64 queries x 64 keys, scores built
// over the head dim in chunks of 32 through shared memory, online softmax in registers; backward
// recomputes probabilities from lse (dq by query tiles, dk/dv by key tiles, no atomics).
#include <cuda_runtime.h>

#include <cmath>

#include "core/cuda/attention.cuh"
#include "core/cuda/dtype.cuh"
#include "core/cuda/launch.cuh"

namespace kiln::cuda {
namespace {

constexpr int kTile = 64;        // queries or keys per tile
constexpr int kThreads = 256;    // 16 x 16: thread (ty, tx) owns tile rows ty + 16 i and columns tx + 16 j
constexpr int kChunk = 32;       // head-dim chunk of the score products
constexpr int kCols = 128;       // output columns per block; wider heads use several blocks (grid.z)
constexpr int kNJ = kCols / 16;  // output columns per thread
constexpr int kChunkPitch = kChunk + 1;  // odd pitches: column reads across threads hit distinct banks
constexpr int kProbPitch = kTile + 1;
constexpr int kColsPitch = kCols + 1;
// Shared memory, in compute-type elements: a staging area (two score chunks, or 64 rows of kCols
// output columns) followed by the (64, 64) probability tile.
constexpr int kStageElems = kTile * kColsPitch;
static_assert(kStageElems >= 2 * kTile * kChunkPitch, "staging area holds both score chunks");
constexpr int kSmemElems = kStageElems + kTile * kProbPitch;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
template <class C> __device__ __forceinline__ C cmax(C a, C b) { return a > b ? a : b; }
__device__ __forceinline__ float attn_exp(float x) { return expf(x); }
__device__ __forceinline__ double attn_exp(double x) { return exp(x); }
__device__ __forceinline__ float attn_log(float x) { return logf(x); }
__device__ __forceinline__ double attn_log(double x) { return log(x); }

// Reductions over the 16 threads (tx = 0..15) that share a tile row; all 32 lanes take part.
template <class C> __device__ __forceinline__ C row_max(C x) {
  for (int o = 8; o > 0; o >>= 1) x = cmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <class C> __device__ __forceinline__ C row_sum(C x) {
  for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Up to 64 rows of one (b, h) slice of an operand: element (r, c) at base[r * rs + c * cs], rows [0, n).
template <class T> struct Rows {
  const T* base;
  int64_t rs, cs;
  int n;
};

template <class T>
__device__ __forceinline__ Rows<T> rows_of(const AttnOperand& op, int64_t b, int64_t h, int64_t row0, int64_t len) {
  const T* p = static_cast<const T*>(op.data) + b * op.stride[0] + h * op.stride[1] + row0 * op.stride[2];
  return {p, op.stride[2], op.stride[3], static_cast<int>(imax(0, imin(kTile, len - row0)))};
}

// dst[r * pitch + c] = src(r, col0 + c) for r < 64, c < W; zeros outside the valid rows and columns.
template <int W, class T, class C>
__device__ __forceinline__ void load_tile(C* dst, int pitch, const Rows<T>& src, int64_t col0, int64_t ncols) {
  for (int e = static_cast<int>(threadIdx.x); e < kTile * W; e += kThreads) {
    const int r = e / W, c = e % W;
    C x = C(0);
    if (r < src.n && col0 + c < ncols) x = static_cast<C>(to_compute(src.base[r * src.rs + (col0 + c) * src.cs]));
    dst[r * pitch + c] = x;
  }
}

// s[i][j] += sum over k < len of a(ty + 16 i, k) * b(tx + 16 j, k).
template <class T, class C>
__device__ void tile_dot(C (&s)[4][4], const Rows<T>& a, const Rows<T>& b, int64_t len, C* stage) {
  C* as = stage;                        // (64, kChunk)
  C* bs = stage + kTile * kChunkPitch;  // (64, kChunk)
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  for (int64_t k0 = 0; k0 < len; k0 += kChunk) {
    load_tile<kChunk>(as, kChunkPitch, a, k0, len);
    load_tile<kChunk>(bs, kChunkPitch, b, k0, len);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      C av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[(ty + 16 * i) * kChunkPitch + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[(tx + 16 * j) * kChunkPitch + k];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }
}

// acc[i][j] += sum over c < 64 of p(ty + 16 i, c) * m(c, col0 + tx + 16 j); p is the (64, 64) tile
// in shared memory, m's rows come from global memory.
template <class T, class C>
__device__ void tile_accumulate(C (&acc)[4][kNJ], const C* ps, const Rows<T>& m, int64_t col0, int64_t ncols,
                                C* stage) {
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  load_tile<kCols>(stage, kColsPitch, m, col0, ncols);  // (64, kCols)
  __syncthreads();
#pragma unroll 4
  for (int c = 0; c < kTile; ++c) {
    C pv[4], mv[kNJ];
#pragma unroll
    for (int i = 0; i < 4; ++i) pv[i] = ps[(ty + 16 * i) * kProbPitch + c];
#pragma unroll
    for (int j = 0; j < kNJ; ++j) mv[j] = stage[c * kColsPitch + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < kNJ; ++j) acc[i][j] += pv[i] * mv[j];
    }
  }
  __syncthreads();
}

struct FwdParams {
  AttnDims dims;
  AttnOperand q, k, v;
  AttnOperand out;  // (B, Hq, T, Dv), written through its strides
  void* lse;        // (B, Hq, T)
};

struct BwdParams {
  AttnDims dims;
  AttnOperand q, k, v, out, dout;
  const void* lse;   // (B, Hq, T)
  const void* dlse;  // (B, Hq, T)
  void* delta;       // (B, Hq, T): rowsum(dout * out) - dlse
  AttnOperand dq;    // (B, Hq, T, D), written through its strides
  AttnOperand dk;    // (B, Hkv, S, D)
  AttnOperand dv;    // (B, Hkv, S, Dv)
  const int* gate;
};

// Element (b, h, l, c) of an output operand.
template <class T>
__device__ __forceinline__ T& out_at(const AttnOperand& o, int64_t b, int64_t h, int64_t l, int64_t c) {
  return static_cast<T*>(const_cast<void*>(o.data))[b * o.stride[0] + h * o.stride[1] + l * o.stride[2] + c * o.stride[3]];
}

// Query tile of this block: the heavy (late, under a causal mask) tiles are scheduled first.
__device__ __forceinline__ int64_t tile_start() { return int64_t(gridDim.y - 1 - blockIdx.y) * kTile; }

// Keys [0, end) that some query of [q0, q0 + n) sees.
__device__ __forceinline__ int64_t keys_end(const AttnDims& d, int64_t q0, int n) {
  return d.causal ? imax(0, imin(d.s, q0 + n + d.s - d.t)) : d.s;
}

// grid (B * Hq, ceil(T / 64), ceil(Dv / kCols))
template <class T>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(const FwdParams p) {
  using C = device_compute_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* stage = reinterpret_cast<C*>(smem_raw);
  C* ps = stage + kStageElems;  // (64, 64) probabilities
  const AttnDims& d = p.dims;
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const int64_t bh = blockIdx.x, b = bh / d.hq, h = bh % d.hq, kh = h / (d.hq / d.hkv);
  const int64_t q0 = tile_start(), col0 = int64_t(blockIdx.z) * kCols, shift = d.s - d.t;
  const Rows<T> q = rows_of<T>(p.q, b, h, q0, d.t);
  const C scale = static_cast<C>(d.scale), neg_inf = static_cast<C>(-INFINITY);
  C m[4], l[4], acc[4][kNJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = neg_inf;
    l[i] = C(0);
#pragma unroll
    for (int j = 0; j < kNJ; ++j) acc[i][j] = C(0);
  }
  const int64_t kend = keys_end(d, q0, q.n);
  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    C s[4][4] = {};
    tile_dot(s, q, rows_of<T>(p.k, b, kh, k0, d.s), d.d, stage);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      C mx = neg_inf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t kj = k0 + tx + 16 * j;
        const bool ok = r < q.n && kj < d.s && (!d.causal || kj <= q0 + r + shift);
        s[i][j] = ok ? s[i][j] * scale : neg_inf;
        mx = cmax(mx, s[i][j]);
      }
      const C m_new = cmax(m[i], row_max(mx));
      const C alpha = m_new == neg_inf ? C(1) : attn_exp(m[i] - m_new);
      C sum = C(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const C e = s[i][j] == neg_inf ? C(0) : attn_exp(s[i][j] - m_new);
        ps[r * kProbPitch + tx + 16 * j] = e;
        sum += e;
      }
      l[i] = l[i] * alpha + row_sum(sum);
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < kNJ; ++j) acc[i][j] *= alpha;
    }
    tile_accumulate(acc, ps, rows_of<T>(p.v, b, kh, k0, d.s), col0, d.dv, stage);
  }
  C* lse = static_cast<C*>(p.lse);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= q.n) continue;
    const int64_t row = bh * d.t + q0 + r;
    const C inv = l[i] > C(0) ? C(1) / l[i] : C(0);  // no visible key: zeros
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < d.dv) out_at<T>(p.out, b, h, q0 + r, col) = from_compute<T>(acc[i][j] * inv);
    }
    if (blockIdx.z == 0 && tx == 0) lse[row] = l[i] > C(0) ? m[i] + attn_log(l[i]) : neg_inf;
  }
}

// delta = rowsum(dout * out) - dlse, one warp per (b, h, t) row.
template <class T>
__global__ void flash_delta_kernel(const BwdParams p) {
  using C = device_compute_t<T>;
  if (p.gate != nullptr && *p.gate == 0) return;
  const AttnDims& d = p.dims;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t rows = d.b * d.hq * d.t, warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
    const int64_t ti = row % d.t, h = (row / d.t) % d.hq, b = row / (d.t * d.hq);
    const T* o = static_cast<const T*>(p.out.data) + b * p.out.stride[0] + h * p.out.stride[1] + ti * p.out.stride[2];
    const T* g = static_cast<const T*>(p.dout.data) + b * p.dout.stride[0] + h * p.dout.stride[1] + ti * p.dout.stride[2];
    C acc = C(0);
    for (int64_t c = lane; c < d.dv; c += 32) {
      acc += static_cast<C>(to_compute(o[c * p.out.stride[3]])) * static_cast<C>(to_compute(g[c * p.dout.stride[3]]));
    }
    acc = row_sum(acc);
    acc += __shfl_xor_sync(0xffffffffu, acc, 16);
    if (lane == 0) static_cast<C*>(p.delta)[row] = acc - static_cast<const C*>(p.dlse)[row];
  }
}

// dq = scale * sum_j p_ij (dp_ij - delta_i) k_j. grid (B * Hq, ceil(T / 64), ceil(D / kCols))
template <class T>
__global__ void __launch_bounds__(kThreads) flash_dq_kernel(const BwdParams p) {
  using C = device_compute_t<T>;
  if (p.gate != nullptr && *p.gate == 0) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* stage = reinterpret_cast<C*>(smem_raw);
  C* ps = stage + kStageElems;  // (64, 64) score gradients
  const AttnDims& d = p.dims;
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const int64_t bh = blockIdx.x, b = bh / d.hq, h = bh % d.hq, kh = h / (d.hq / d.hkv);
  const int64_t q0 = tile_start(), col0 = int64_t(blockIdx.z) * kCols, shift = d.s - d.t;
  const Rows<T> q = rows_of<T>(p.q, b, h, q0, d.t);
  const Rows<T> dout = rows_of<T>(p.dout, b, h, q0, d.t);
  const C scale = static_cast<C>(d.scale);
  const C* lse = static_cast<const C*>(p.lse);
  const C* delta = static_cast<const C*>(p.delta);
  C lse_r[4], delta_r[4], acc[4][kNJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    lse_r[i] = r < q.n ? lse[bh * d.t + q0 + r] : C(0);
    delta_r[i] = r < q.n ? delta[bh * d.t + q0 + r] : C(0);
#pragma unroll
    for (int j = 0; j < kNJ; ++j) acc[i][j] = C(0);
  }
  const int64_t kend = keys_end(d, q0, q.n);
  for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
    const Rows<T> k = rows_of<T>(p.k, b, kh, k0, d.s);
    C s[4][4] = {}, dp[4][4] = {};
    tile_dot(s, q, k, d.d, stage);
    tile_dot(dp, dout, rows_of<T>(p.v, b, kh, k0, d.s), d.dv, stage);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t kj = k0 + tx + 16 * j;
        const bool ok = r < q.n && kj < d.s && (!d.causal || kj <= q0 + r + shift);
        ps[r * kProbPitch + tx + 16 * j] =
            ok ? attn_exp(s[i][j] * scale - lse_r[i]) * (dp[i][j] - delta_r[i]) : C(0);
      }
    }
    tile_accumulate(acc, ps, k, col0, d.d, stage);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= q.n) continue;
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < d.d) out_at<T>(p.dq, b, h, q0 + r, col) = from_compute<T>(acc[i][j] * scale);
    }
  }
}

// dv = sum_i p_ij dout_i and dk = scale * sum_i p_ij (dp_ij - delta_i) q_i over the queries of every
// head in the kv head's group. grid (B * Hkv, ceil(S / 64), ceil(D / kCols) + ceil(Dv / kCols)):
// the first z-slices write dk's columns, the rest dv's.
template <class T>
__global__ void __launch_bounds__(kThreads) flash_dkdv_kernel(const BwdParams p) {
  using C = device_compute_t<T>;
  if (p.gate != nullptr && *p.gate == 0) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* stage = reinterpret_cast<C*>(smem_raw);
  C* ps = stage + kStageElems;  // (64 keys, 64 queries) probabilities or score gradients
  const AttnDims& d = p.dims;
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const int64_t bkh = blockIdx.x, b = bkh / d.hkv, kh = bkh % d.hkv, group = d.hq / d.hkv;
  const int64_t k0 = int64_t(blockIdx.y) * kTile, shift = d.s - d.t;
  const int64_t n_dk = (d.d + kCols - 1) / kCols;
  const bool is_dk = blockIdx.z < n_dk;  // uniform over the block
  const int64_t col0 = (is_dk ? int64_t(blockIdx.z) : int64_t(blockIdx.z) - n_dk) * kCols;
  const int64_t ncols = is_dk ? d.d : d.dv;
  const Rows<T> k = rows_of<T>(p.k, b, kh, k0, d.s);
  const Rows<T> v = rows_of<T>(p.v, b, kh, k0, d.s);
  const C scale = static_cast<C>(d.scale);
  const C* lse = static_cast<const C*>(p.lse);
  const C* delta = static_cast<const C*>(p.delta);
  // first query that sees key k0 under the causal mask, rounded down to a tile
  const int64_t qstart = d.causal ? imax(0, k0 - shift) / kTile * kTile : 0;
  C acc[4][kNJ];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < kNJ; ++j) acc[i][j] = C(0);
  }
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    const int64_t bh = b * d.hq + h;
    for (int64_t q0 = qstart; q0 < d.t; q0 += kTile) {
      const Rows<T> q = rows_of<T>(p.q, b, h, q0, d.t);
      const Rows<T> dout = rows_of<T>(p.dout, b, h, q0, d.t);
      C lse_c[4], delta_c[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = tx + 16 * j;
        lse_c[j] = c < q.n ? lse[bh * d.t + q0 + c] : C(0);
        delta_c[j] = c < q.n ? delta[bh * d.t + q0 + c] : C(0);
      }
      C st[4][4] = {}, dpt[4][4] = {};
      tile_dot(st, k, q, d.d, stage);
      if (is_dk) tile_dot(dpt, v, dout, d.dv, stage);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = tx + 16 * j;
          const bool ok = r < k.n && c < q.n && (!d.causal || k0 + r <= q0 + c + shift);
          const C pr = ok ? attn_exp(st[i][j] * scale - lse_c[j]) : C(0);
          ps[r * kProbPitch + c] = is_dk ? pr * (dpt[i][j] - delta_c[j]) : pr;
        }
      }
      tile_accumulate(acc, ps, is_dk ? q : dout, col0, ncols, stage);
    }
  }
  const AttnOperand& dst = is_dk ? p.dk : p.dv;
  const C mult = is_dk ? scale : C(1);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= k.n) continue;
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < ncols) out_at<T>(dst, b, kh, k0 + r, col) = from_compute<T>(acc[i][j] * mult);
    }
  }
}

template <class S, class D>
__global__ void pack_rows_kernel(const S* src, int64_t n0, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                                 D* dst, int* nonzero) {
  const int64_t n = n0 * n1 * n2;
  bool any = false;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % n2, b = (i / n2) % n1, a = i / (n1 * n2);
    const D x = static_cast<D>(to_compute(src[a * s0 + b * s1 + c * s2]));
    dst[i] = x;
    any = any || x != D(0);
  }
  if (nonzero != nullptr && any) *nonzero = 1;  // every writer stores the same value
}

template <class E>
__global__ void contiguous_kernel(int64_t n, const Strided<2> st, E* dst, const E* src) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[2];
    st.offsets(i, off);
    dst[off[0]] = src[off[1]];
  }
}

// Blocks of the small grid-stride helper kernels (delta, row packing, copies), at most.
constexpr int64_t kHelperBlocks = 8192;

// Calls fn(T{}) with the device element type of a float dtype; false for other dtypes.
template <class Fn> bool visit_float_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f64: fn(double{}); return true;
    case DType::f32: fn(float{}); return true;
    case DType::bf16: fn(__nv_bfloat16{}); return true;
    case DType::f16: fn(__half{}); return true;
    default: return false;
  }
}

template <class K> cudaError_t allow_smem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

cudaError_t launch_flash_forward(DType dtype, const AttnDims& dims, const AttnOperand& q, const AttnOperand& k,
                                 const AttnOperand& v, const AttnOperand& out, void* lse, void* stream) {
  cudaError_t err = cudaSuccess;
  const bool ok = visit_float_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = device_compute_t<T>;
    const size_t smem = kSmemElems * sizeof(C);
    const dim3 grid(static_cast<unsigned>(dims.b * dims.hq), static_cast<unsigned>(ceil_div(dims.t, kTile)),
                    static_cast<unsigned>(ceil_div(dims.dv, kCols)));
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if ((err = allow_smem(flash_forward_kernel<T>, smem)) != cudaSuccess) return;
    flash_forward_kernel<T><<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(FwdParams{dims, q, k, v, out, lse});
    err = cudaGetLastError();
  });
  return ok ? err : cudaErrorInvalidValue;
}

cudaError_t launch_flash_backward(DType dtype, const AttnDims& dims, const AttnOperand& q, const AttnOperand& k,
                                  const AttnOperand& v, const AttnOperand& out, const AttnOperand& dout,
                                  const void* lse, const void* dlse, void* delta, const AttnOperand& dq,
                                  const AttnOperand& dk, const AttnOperand& dv, const int* gate, void* stream) {
  cudaError_t err = cudaSuccess;
  const BwdParams params{dims, q, k, v, out, dout, lse, dlse, delta, dq, dk, dv, gate};
  const auto st = static_cast<cudaStream_t>(stream);
  const bool ok = visit_float_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = device_compute_t<T>;
    const size_t smem = kSmemElems * sizeof(C);
    const int64_t rows = dims.b * dims.hq * dims.t;
    if (rows > 0) {
      flash_delta_kernel<T><<<grid_for(rows * 32, kThreads, kHelperBlocks), kThreads, 0, st>>>(params);
      if ((err = cudaGetLastError()) != cudaSuccess) return;
      const dim3 grid(static_cast<unsigned>(dims.b * dims.hq), static_cast<unsigned>(ceil_div(dims.t, kTile)),
                      static_cast<unsigned>(ceil_div(dims.d, kCols)));
      if (grid.z > 0) {
        if ((err = allow_smem(flash_dq_kernel<T>, smem)) != cudaSuccess) return;
        flash_dq_kernel<T><<<grid, kThreads, smem, st>>>(params);
        if ((err = cudaGetLastError()) != cudaSuccess) return;
      }
    }
    const dim3 grid(static_cast<unsigned>(dims.b * dims.hkv), static_cast<unsigned>(ceil_div(dims.s, kTile)),
                    static_cast<unsigned>(ceil_div(dims.d, kCols) + ceil_div(dims.dv, kCols)));
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if ((err = allow_smem(flash_dkdv_kernel<T>, smem)) != cudaSuccess) return;
    flash_dkdv_kernel<T><<<grid, kThreads, smem, st>>>(params);
    err = cudaGetLastError();
  });
  return ok ? err : cudaErrorInvalidValue;
}

cudaError_t launch_pack_rows(DType src_dtype, const void* src, const int64_t (&shape)[3], const int64_t (&strides)[3],
                             DType dst_dtype, void* dst, int* nonzero, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  if (nonzero != nullptr) {
    const cudaError_t err = cudaMemsetAsync(nonzero, 0, sizeof(int), st);
    if (err != cudaSuccess) return err;
  }
  const int64_t n = shape[0] * shape[1] * shape[2];
  if (n == 0) return cudaSuccess;
  if (dst_dtype != DType::f32 && dst_dtype != DType::f64) return cudaErrorInvalidValue;
  const bool ok = visit_float_dtype(src_dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* s = static_cast<const S*>(src);
    if (dst_dtype == DType::f32) {
      pack_rows_kernel<S, float><<<grid_for(n, 256, kHelperBlocks), 256, 0, st>>>(s, shape[0], shape[1], shape[2], strides[0], strides[1],
                                                                   strides[2], static_cast<float*>(dst), nonzero);
    } else {
      pack_rows_kernel<S, double><<<grid_for(n, 256, kHelperBlocks), 256, 0, st>>>(s, shape[0], shape[1], shape[2], strides[0], strides[1],
                                                                    strides[2], static_cast<double*>(dst), nonzero);
    }
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_attn_contiguous(int64_t numel, int elem_size, const Strided<2>& st, void* dst, const void* src,
                                   void* stream) {
  if (numel == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = grid_for(numel, 256, kHelperBlocks);
  switch (elem_size) {
    case 2: contiguous_kernel<<<grid, 256, 0, s>>>(numel, st, static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src)); break;
    case 4: contiguous_kernel<<<grid, 256, 0, s>>>(numel, st, static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src)); break;
    case 8: contiguous_kernel<<<grid, 256, 0, s>>>(numel, st, static_cast<uint64_t*>(dst), static_cast<const uint64_t*>(src)); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace kiln::cuda

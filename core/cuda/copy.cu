// Copy-family kernels: strided/broadcast copy with a cast between any two of the 8 dtypes (fast
// 32-bit index math from indexer.cuh when it fits), a shared-memory tiled transpose, a contiguous
// cast with vector loads and stores of up to 16 bytes, and fills.
// Conversions follow kiln::convert exactly (core/cuda/convert.cuh). Launchers: core/cuda/copy.cuh.
#include <cstring>

#include "core/cuda/convert.cuh"
#include "core/cuda/copy.cuh"
#include "core/cuda/indexer.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;

// ---- kernels ----------------------------------------------------------------------------------

template <class D, class S>
__global__ void __launch_bounds__(kThreads) copy_strided_kernel(D* __restrict__ dst, const S* __restrict__ src,
                                                                Indexer<2> ix, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(i, off);
    dst[off[0]] = cast_value<D>(src[off[1]]);
  }
}

// V elements per step: 16 bytes of the wider type, so every load and store instruction of a warp
// covers one contiguous span (two 16-byte stores per thread would half-fill sectors per instruction).
template <class D, class S>
inline constexpr int kCastVec = static_cast<int>(16 / (sizeof(D) > sizeof(S) ? sizeof(D) : sizeof(S)));

template <class D, class S>
__global__ void copy_contiguous_vec_kernel(D* __restrict__ dst, const S* __restrict__ src, int64_t n) {
  constexpr int V = kCastVec<D, S>;
  const int64_t nvec = n / V;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = start; v < nvec; v += stride) {
    S in[V];
    load_raw<V>(src + v * V, in);
    D out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = cast_value<D>(in[k]);
    store_raw<V>(dst + v * V, out);
  }
  for (int64_t i = nvec * V + start; i < n; i += stride) dst[i] = cast_value<D>(src[i]);
}

template <class D, class S>
__global__ void copy_contiguous_kernel(D* __restrict__ dst, const S* __restrict__ src, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = cast_value<D>(src[i]);
}

// Transposing copies: dst (batch, R, C) <- src where one operand is contiguous along R and the
// other along C. A 32x32 tile goes through shared memory so reads and writes are both coalesced.
constexpr int kTile = 32;
constexpr int kTileRows = 8;
struct TransposeArgs {
  int64_t batch, rows, cols;
  int64_t d_b, d_r, d_c;  // dst strides (d_c == 1)
  int64_t s_b, s_r, s_c;  // src strides (s_r == 1)
};

template <class D, class S>
__global__ void __launch_bounds__(kTile* kTileRows) copy_transpose_kernel(D* __restrict__ dst, const S* __restrict__ src,
                                                                          TransposeArgs a) {
  __shared__ S tile[kTile][kTile + 1];  // [c - c0][r - r0]; +1 avoids bank conflicts
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile, r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  for (int64_t b = blockIdx.z; b < a.batch; b += gridDim.z) {
    const S* sp = src + b * a.s_b;
    D* dp = dst + b * a.d_b;
    for (int j = ty; j < kTile; j += kTileRows) {  // a warp reads along r, src's contiguous dim
      const int64_t r = r0 + tx, c = c0 + j;
      if (r < a.rows && c < a.cols) tile[j][tx] = sp[r * a.s_r + c * a.s_c];
    }
    __syncthreads();
    for (int j = ty; j < kTile; j += kTileRows) {  // and writes along c, dst's contiguous dim
      const int64_t r = r0 + j, c = c0 + tx;
      if (r < a.rows && c < a.cols) dp[r * a.d_r + c * a.d_c] = cast_value<D>(tile[tx][j]);
    }
    __syncthreads();
  }
}

// The transposing layouts copy_transpose_kernel serves: 2 or 3 merged dims (batch outermost), one
// operand contiguous along the last dim and the other along the one before, both at least a tile.
bool as_transpose(const Strided<2>& st, TransposeArgs& a) {
  const int nd = st.ndim;
  if (nd != 2 && nd != 3) return false;
  const int r = nd - 2, c = nd - 1;
  a.batch = nd == 3 ? st.shape[0] : 1;
  a.d_b = nd == 3 ? st.strides[0][0] : 0;
  a.s_b = nd == 3 ? st.strides[1][0] : 0;
  if (st.strides[0][c] == 1 && st.strides[1][r] == 1) {
    a.rows = st.shape[r];
    a.cols = st.shape[c];
    a.d_r = st.strides[0][r], a.d_c = 1, a.s_r = 1, a.s_c = st.strides[1][c];
  } else if (st.strides[0][r] == 1 && st.strides[1][c] == 1) {  // swap the roles of the two dims
    a.rows = st.shape[c];
    a.cols = st.shape[r];
    a.d_r = st.strides[0][c], a.d_c = 1, a.s_r = 1, a.s_c = st.strides[1][r];
  } else {
    return false;
  }
  return a.rows >= kTile && a.cols >= kTile && (a.rows + kTile - 1) / kTile <= 65535;
}

template <class T>
__global__ void __launch_bounds__(kThreads) fill_strided_kernel(T* __restrict__ dst, T value, Indexer<1> ix, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[ix.offset(i)] = value;
}

template <class T>
__global__ void fill_contiguous_kernel(T* __restrict__ dst, T value, int64_t n, bool aligned) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    T vals[V];
#pragma unroll
    for (int k = 0; k < V; ++k) vals[k] = value;
    for (int64_t v = start; v < nvec; v += stride) store_raw<V>(dst + v * V, vals);
    done = nvec * V;
  }
  for (int64_t i = done + start; i < n; i += stride) dst[i] = value;
}

// ---- launchers --------------------------------------------------------------------------------

template <class D, class S>
cudaError_t copy_strided(D* dst, const S* src, const Strided<2>& st, int64_t n, cudaStream_t s) {
  TransposeArgs a;
  if (as_transpose(st, a)) {
    const dim3 grid(static_cast<unsigned>((a.cols + kTile - 1) / kTile), static_cast<unsigned>((a.rows + kTile - 1) / kTile),
                    static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
    copy_transpose_kernel<D, S><<<grid, dim3(kTile, kTileRows), 0, s>>>(dst, src, a);
    return cudaGetLastError();
  }
  copy_strided_kernel<D, S><<<grid_to_fill(n, kThreads), kThreads, 0, s>>>(dst, src, Indexer<2>(st, n), n);
  return cudaGetLastError();
}

template <class D, class S>
cudaError_t copy_contiguous(D* dst, const S* src, int64_t n, cudaStream_t s) {
  if (aligned16(dst) && aligned16(src)) {
    constexpr int V = kCastVec<D, S>;
    copy_contiguous_vec_kernel<D, S><<<grid_to_fill((n + V - 1) / V, kThreads), kThreads, 0, s>>>(dst, src, n);
  } else {
    copy_contiguous_kernel<D, S><<<grid_to_fill(n, kThreads), kThreads, 0, s>>>(dst, src, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_copy_strided(void* dst, DType dst_dtype, const void* src, DType src_dtype, const Strided<2>& st,
                                int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return visit_cuda_dtype(dst_dtype, [&](auto dt) {
    using D = typename decltype(dt)::type;
    return visit_cuda_dtype(src_dtype, [&](auto sty) {
      using S = typename decltype(sty)::type;
      return copy_strided<D, S>(static_cast<D*>(dst), static_cast<const S*>(src), st, n, static_cast<cudaStream_t>(stream));
    });
  });
}

cudaError_t launch_copy_contiguous(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  return visit_cuda_dtype(dst_dtype, [&](auto dt) {
    using D = typename decltype(dt)::type;
    return visit_cuda_dtype(src_dtype, [&](auto sty) {
      using S = typename decltype(sty)::type;
      return copy_contiguous<D, S>(static_cast<D*>(dst), static_cast<const S*>(src), n, static_cast<cudaStream_t>(stream));
    });
  });
}

cudaError_t launch_fill(void* dst, DType dtype, uint64_t bits, const Strided<1>& st, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T value;
    std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));
    T* p = static_cast<T*>(dst);
    if (st.ndim == 1 && st.strides[0][0] == 1) {
      constexpr int V = static_cast<int>(16 / sizeof(T));
      fill_contiguous_kernel<T><<<grid_to_fill((n + V - 1) / V, kThreads), kThreads, 0, s>>>(p, value, n, aligned16(p));
    } else {
      fill_strided_kernel<T><<<grid_to_fill(n, kThreads), kThreads, 0, s>>>(p, value, Indexer<1>(st, n), n);
    }
    return cudaGetLastError();
  });
}

}  // namespace kiln::cuda

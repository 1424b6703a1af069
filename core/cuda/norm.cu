// RMSNorm kernels. Forward: one block per row (grid-stride); each thread loads its first ITEMS
// 16-byte packs of the row at once (many loads in flight), keeps them raw in registers across the
// sum of squares, and re-reads only columns beyond them. Backward: each block owns a fixed chunk of
// rows (a function of the row count only), writes dx per row and its dw partial; rows of up to
// 512 packs stream through a cp.async pipeline in shared memory with w and the dw partial in
// registers, longer ones are read twice with dw in shared memory. A second kernel adds the partials
// in a fixed order, so dw is deterministic.
#include <type_traits>

#include "core/cuda/fused_common.cuh"
#include "core/cuda/norm.cuh"

namespace kiln::cuda {
namespace {

using namespace fused;

constexpr int kFwdItems = 8;        // packs per thread held in registers (forward)
constexpr int kBwdItems = 2;        // packs of x and of g per thread (backward)
constexpr int64_t kMaxBlocks = 512;  // backward blocks: all resident at once on a 132-SM GPU (4 per SM)
constexpr size_t kMaxSmemAcc = 48 * 1024;

int64_t rows_per_block(int64_t r) { return r <= kMaxBlocks ? 1 : (r + kMaxBlocks - 1) / kMaxBlocks; }

template <class T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const T* __restrict__ x, Strided<1> rows, int64_t xs,
                                                               const T* __restrict__ w, int64_t ws, int64_t r,
                                                               int64_t d, double eps, T* __restrict__ out) {
  using C = device_compute_t<T>;
  __shared__ C red[64];
  const int64_t nvec = d / VEC;
  const int nt = blockDim.x, tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < r; row += gridDim.x) {
    int64_t off[1];
    rows.offsets(row, off);
    const T* xr = x + off[0];
    Pack<T, VEC> cache[ITEMS];  // raw: half the registers of f32 values for bf16
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t vi = tid + static_cast<int64_t>(it) * nt;
      if (vi < nvec) cache[it] = load_pack<VEC>(vec_at<VEC>(xr, vi, xs));
    }
    C ss = 0;
    auto square_sum = [&](const Pack<T, VEC>& pk) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const C a = static_cast<C>(to_compute(pk.v[k]));
        ss += a * a;
      }
    };
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      if (tid + static_cast<int64_t>(it) * nt < nvec) square_sum(cache[it]);
    }
    for (int64_t vi = tid + static_cast<int64_t>(ITEMS) * nt; vi < nvec; vi += nt) {
      square_sum(load_pack<VEC>(vec_at<VEC>(xr, vi, xs)));
    }
    ss = block_sum(ss, red);
    const C rstd = C(1) / sqrt(ss / static_cast<C>(d) + static_cast<C>(eps));
    T* orow = out + row * d;
    auto emit = [&](int64_t vi, const Pack<T, VEC>& pk) {  // element by element: few live registers
      const Pack<T, VEC> wp = load_pack<VEC>(vec_at<VEC>(w, vi, ws));
      Pack<T, VEC> y;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        y.v[k] = from_compute<T>(static_cast<C>(to_compute(pk.v[k])) * rstd * static_cast<C>(to_compute(wp.v[k])));
      }
      *reinterpret_cast<Pack<T, VEC>*>(orow + vi * VEC) = y;
    };
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t vi = tid + static_cast<int64_t>(it) * nt;
      if (vi < nvec) emit(vi, cache[it]);
    }
    for (int64_t vi = tid + static_cast<int64_t>(ITEMS) * nt; vi < nvec; vi += nt) {
      emit(vi, load_pack<VEC>(vec_at<VEC>(xr, vi, xs)));
    }
  }
}

// Block b handles rows [b * rpb, (b + 1) * rpb): dx per row, and the block's dw partial (the sum of
// g * x * rstd over its rows) into partial[b] (d). The accumulator is shared memory laid out
// (VEC, nvec) (conflict-free) when SMEM, else partial[b] itself (d).
template <class T, int VEC, int ITEMS, bool SMEM>
__global__ void __launch_bounds__(kRowThreads, 2)
    rms_norm_backward_kernel(const T* __restrict__ x, const T* __restrict__ g, Strided<2> rows, int64_t xs,
                             int64_t gs, const T* __restrict__ w, int64_t ws, int64_t r, int64_t d, double eps,
                             int64_t rpb, const T* __restrict__ addend, T* __restrict__ dx,
                             device_compute_t<T>* __restrict__ partial) {
  using C = device_compute_t<T>;
  __shared__ C red[64];
  extern __shared__ __align__(16) unsigned char dyn[];
  const int64_t nvec = d / VEC;
  const int nt = blockDim.x, tid = threadIdx.x;
  C* part = partial + static_cast<int64_t>(blockIdx.x) * d;  // (d)
  C* acc = SMEM ? reinterpret_cast<C*>(dyn) : part;
  auto acc_at = [&](int64_t vi, int k) -> C& {
    if constexpr (SMEM) return acc[static_cast<int>(k * nvec + vi)];
    else return acc[vi * VEC + k];
  };
  for (int64_t vi = tid; vi < nvec; vi += nt) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc_at(vi, k) = 0;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rpb;
  const int64_t last = first + rpb < r ? first + rpb : r;
  for (int64_t row = first; row < last; ++row) {
    int64_t off[2];
    rows.offsets(row, off);
    const T* xr = x + off[0];
    const T* gr = g + off[1];
    Pack<T, VEC> xc[ITEMS], gc[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t vi = tid + static_cast<int64_t>(it) * nt;
      if (vi < nvec) {
        xc[it] = load_pack<VEC>(vec_at<VEC>(xr, vi, xs));
        gc[it] = load_pack<VEC>(vec_at<VEC>(gr, vi, gs));
      }
    }
    C ss = 0, gwx = 0;
    auto sums = [&](int64_t vi, const Pack<T, VEC>& xp, const Pack<T, VEC>& gp) {
      const Pack<T, VEC> wp = load_pack<VEC>(vec_at<VEC>(w, vi, ws));
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const C a = static_cast<C>(to_compute(xp.v[k]));
        ss += a * a;
        gwx += static_cast<C>(to_compute(gp.v[k])) * static_cast<C>(to_compute(wp.v[k])) * a;
      }
    };
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t vi = tid + static_cast<int64_t>(it) * nt;
      if (vi < nvec) sums(vi, xc[it], gc[it]);
    }
    for (int64_t vi = tid + static_cast<int64_t>(ITEMS) * nt; vi < nvec; vi += nt) {
      sums(vi, load_pack<VEC>(vec_at<VEC>(xr, vi, xs)), load_pack<VEC>(vec_at<VEC>(gr, vi, gs)));
    }
    block_sum2(ss, gwx, red);
    const C rstd = C(1) / sqrt(ss / static_cast<C>(d) + static_cast<C>(eps));
    // dx = rstd * w * g - x * rstd^3 * sum(g * w * x) / d
    const C c = rstd * rstd * rstd * gwx / static_cast<C>(d);
    T* dxr = dx + row * d;
    const T* ar = addend ? addend + row * d : nullptr;
    auto emit = [&](int64_t vi, const Pack<T, VEC>& xp, const Pack<T, VEC>& gp) {
      const Pack<T, VEC> wp = load_pack<VEC>(vec_at<VEC>(w, vi, ws));
      Pack<T, VEC> y;
      if (ar) y = load_pack<VEC>(ar + vi * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const C a = static_cast<C>(to_compute(xp.v[k])), b = static_cast<C>(to_compute(gp.v[k]));
        const C sum = rstd * static_cast<C>(to_compute(wp.v[k])) * b - a * c;
        y.v[k] = from_compute<T>(ar ? sum + static_cast<C>(to_compute(y.v[k])) : sum);
        acc_at(vi, k) += b * a * rstd;
      }
      *reinterpret_cast<Pack<T, VEC>*>(dxr + vi * VEC) = y;
    };
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t vi = tid + static_cast<int64_t>(it) * nt;
      if (vi < nvec) emit(vi, xc[it], gc[it]);
    }
    for (int64_t vi = tid + static_cast<int64_t>(ITEMS) * nt; vi < nvec; vi += nt) {
      emit(vi, load_pack<VEC>(vec_at<VEC>(xr, vi, xs)), load_pack<VEC>(vec_at<VEC>(gr, vi, gs)));
    }
  }
  if constexpr (SMEM) {
    for (int64_t vi = tid; vi < nvec; vi += nt) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[vi * VEC + k] = acc[k * nvec + vi];
    }
  }
}

// Staged backward for rows of at most ITEMS * kRowThreads packs (contiguous, 16-byte aligned): thread
// t owns the fixed columns of packs t + i * blockDim.x, so w and its dw accumulators stay in
// registers; each thread copies its own packs of the next kStages - 1 rows of x and g into shared
// memory with cp.async (thread-private: no barrier needed to read them), so a row's loads are in
// flight while earlier rows are reduced and written.
constexpr int kStages = 3;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <class T, int ITEMS>
__global__ void __launch_bounds__(256, 4)
    rms_norm_backward_staged_kernel(const T* __restrict__ x, const T* __restrict__ g, Strided<2> rows,
                                    const T* __restrict__ w, int64_t r, int64_t d, double eps, int64_t rpb,
                                    const T* __restrict__ addend, T* __restrict__ dx,
                                    device_compute_t<T>* __restrict__ partial) {
  using C = device_compute_t<T>;
  constexpr int VEC = vec_of<T>();
  using P = Pack<T, VEC>;
  __shared__ C red[64];
  extern __shared__ __align__(16) unsigned char dyn[];
  P* stage = reinterpret_cast<P*>(dyn);  // (kStages, 2 (x, g), ITEMS, blockDim.x)
  const int nvec = static_cast<int>(d / VEC), nt = blockDim.x, tid = threadIdx.x;
  auto slot = [&](int64_t i, int which, int it) -> P& { return stage[((i % kStages) * 2 + which) * ITEMS * nt + it * nt + tid]; };
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rpb;
  const int64_t last = first + rpb < r ? first + rpb : r;
  auto issue = [&](int64_t row) {  // copies of row `row` (if any), as one group
    if (row < last) {
      int64_t off[2];
      rows.offsets(row, off);
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int vi = tid + it * nt;
        if (vi < nvec) {
          cp_async16(&slot(row - first, 0, it), x + off[0] + vi * VEC);
          cp_async16(&slot(row - first, 1, it), g + off[1] + vi * VEC);
        }
      }
    }
    cp_async_commit();
  };
  P wp[ITEMS];
  C acc[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int vi = tid + it * nt;
    if (vi < nvec) wp[it] = load_pack<VEC>(w + vi * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[it][k] = 0;
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(first + s);
  for (int64_t row = first; row < last; ++row) {
    issue(row + kStages - 1);
    cp_async_wait<kStages - 1>();  // this thread's copies of `row` have landed
    C ss = 0, gwx = 0;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      if (tid + it * nt < nvec) {
        const P xp = slot(row - first, 0, it), gp = slot(row - first, 1, it);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const C a = static_cast<C>(to_compute(xp.v[k]));
          ss += a * a;
          gwx += static_cast<C>(to_compute(gp.v[k])) * static_cast<C>(to_compute(wp[it].v[k])) * a;
        }
      }
    }
    block_sum2(ss, gwx, red);
    const C rstd = C(1) / sqrt(ss / static_cast<C>(d) + static_cast<C>(eps));
    // dx = rstd * w * g - x * rstd^3 * sum(g * w * x) / d
    const C c = rstd * rstd * rstd * gwx / static_cast<C>(d);
    T* dxr = dx + row * d;
    const T* ar = addend ? addend + row * d : nullptr;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int vi = tid + it * nt;
      if (vi < nvec) {
        const P xp = slot(row - first, 0, it), gp = slot(row - first, 1, it);
        P y;
        if (ar) y = load_pack<VEC>(ar + vi * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const C a = static_cast<C>(to_compute(xp.v[k])), b = static_cast<C>(to_compute(gp.v[k]));
          const C sum = rstd * static_cast<C>(to_compute(wp[it].v[k])) * b - a * c;
          y.v[k] = from_compute<T>(ar ? sum + static_cast<C>(to_compute(y.v[k])) : sum);
          acc[it][k] += b * a * rstd;
        }
        *reinterpret_cast<P*>(dxr + vi * VEC) = y;
      }
    }
  }
  cp_async_wait<0>();
  C* part = partial + static_cast<int64_t>(blockIdx.x) * d;  // (d)
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int vi = tid + it * nt;
    if (vi < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[vi * VEC + k] = acc[it][k];
    }
  }
}

constexpr int kDwSplit = 8;  // block ranges summed side by side by the dw kernel

// dw[j] = the sum over blocks b of partial[b][j]: kDwSplit fixed contiguous ranges of b (threadIdx.y)
// each summed in order, then the ranges added in order; 32 columns per block.
template <class T>
__global__ void __launch_bounds__(32 * kDwSplit)
    rms_norm_dw_kernel(const device_compute_t<T>* __restrict__ partial, int64_t blocks, int64_t d, T* __restrict__ dw) {
  using C = device_compute_t<T>;
  __shared__ C part[kDwSplit][32];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t per = (blocks + kDwSplit - 1) / kDwSplit, b0 = threadIdx.y * per;
  const int64_t b1 = b0 + per < blocks ? b0 + per : blocks;
  C acc = 0;
  if (j < d) {
    for (int64_t b = b0; b < b1; ++b) acc += partial[b * d + j];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    for (int y = 1; y < kDwSplit; ++y) acc += part[y][threadIdx.x];
    dw[j] = from_compute<T>(acc);
  }
}

}  // namespace

cudaError_t launch_rms_norm(DType dt, const void* x, const Strided<1>& rows, int64_t xs, const void* w, int64_t ws,
                            int64_t r, int64_t d, double eps, void* out, void* stream) {
  if (r == 0 || d == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = vec_of<T>();
    const bool vec = xs == 1 && d % V == 0 && aligned16(x) && rows_aligned16(rows, 0, sizeof(T)) && ws == 1 &&
                     aligned16(w) && aligned16(out);
    const int threads = row_threads(vec ? d / V : d, kFwdItems);
    const int grid = static_cast<int>(r < kMaxGrid ? r : kMaxGrid);
    if (vec) {
      rms_norm_kernel<T, V, kFwdItems><<<grid, threads, 0, s>>>(static_cast<const T*>(x), rows, xs,
                                                                static_cast<const T*>(w), ws, r, d, eps,
                                                                static_cast<T*>(out));
    } else {
      rms_norm_kernel<T, 1, kFwdItems><<<grid, threads, 0, s>>>(static_cast<const T*>(x), rows, xs,
                                                                static_cast<const T*>(w), ws, r, d, eps,
                                                                static_cast<T*>(out));
    }
    return cudaGetLastError();
  });
}

size_t rms_norm_backward_workspace(DType dt, int64_t r, int64_t d) {
  const int64_t rpb = rows_per_block(r);
  return static_cast<size_t>((r + rpb - 1) / rpb * d) * (dt == DType::f64 ? 8 : 4);
}

cudaError_t launch_rms_norm_backward(DType dt, const void* x, const void* g, const Strided<2>& rows, int64_t xs,
                                     int64_t gs, const void* w, int64_t ws, int64_t r, int64_t d, double eps,
                                     const void* addend, void* dx, void* dw, void* workspace, void* stream) {
  if (d == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  if (r == 0) return cudaMemsetAsync(dw, 0, static_cast<size_t>(d) * itemsize(dt), s);
  const int64_t rpb = rows_per_block(r);
  const int64_t blocks = (r + rpb - 1) / rpb;
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = device_compute_t<T>;
    constexpr int V = vec_of<T>();
    const bool vec = xs == 1 && gs == 1 && d % V == 0 && aligned16(x) && aligned16(g) &&
                     rows_aligned16(rows, 0, sizeof(T)) && rows_aligned16(rows, 1, sizeof(T)) && ws == 1 &&
                     aligned16(w) && aligned16(dx) && (addend == nullptr || aligned16(addend));
    const T* add = static_cast<const T*>(addend);
    auto* partial = static_cast<C*>(workspace);  // (blocks, d)
    if (vec && d / V <= 256 * kBwdItems) {  // staged: w and dw in registers, rows in flight through smem
      const int threads = row_threads(d / V, kBwdItems);
      const size_t smem = static_cast<size_t>(kStages) * 2 * kBwdItems * threads * 16;
      auto kernel = rms_norm_backward_staged_kernel<T, kBwdItems>;
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
      kernel<<<static_cast<unsigned>(blocks), threads, smem, s>>>(static_cast<const T*>(x), static_cast<const T*>(g),
                                                                  rows, static_cast<const T*>(w), r, d, eps, rpb,
                                                                  add, static_cast<T*>(dx), partial);
    } else {  // dw accumulated in shared memory when it fits, else in the block's partial row
      const int threads = row_threads(vec ? d / V : d, kBwdItems);
      const size_t acc_bytes = static_cast<size_t>(d) * sizeof(C);
      const bool smem_acc = acc_bytes <= kMaxSmemAcc;
      const size_t smem = smem_acc ? acc_bytes : 0;
      auto launch = [&](auto vtag, auto stag) {
        rms_norm_backward_kernel<T, decltype(vtag)::value, kBwdItems, decltype(stag)::value>
            <<<static_cast<unsigned>(blocks), threads, smem, s>>>(static_cast<const T*>(x), static_cast<const T*>(g),
                                                                  rows, xs, gs, static_cast<const T*>(w), ws, r, d, eps,
                                                                  rpb, add, static_cast<T*>(dx), partial);
      };
      using V8 = std::integral_constant<int, V>;
      using V1 = std::integral_constant<int, 1>;
      if (vec && smem_acc) launch(V8{}, std::true_type{});
      else if (vec) launch(V8{}, std::false_type{});
      else if (smem_acc) launch(V1{}, std::true_type{});
      else launch(V1{}, std::false_type{});
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    rms_norm_dw_kernel<T><<<static_cast<unsigned>((d + 31) / 32), dim3(32, kDwSplit), 0, s>>>(partial, blocks, d,
                                                                                          static_cast<T*>(dw));
    return cudaGetLastError();
  });
}

}  // namespace kiln::cuda

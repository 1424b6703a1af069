// Cross-entropy kernels: one block per row of logits (up to Llama's 128,256), an online softmax in
// f32 (f64 for f64) over 16-byte loads issued several at a time (double-buffered in the forward),
// then either the row's loss (forward) or its gradient (backward, which reads the row a second time
// in reverse order, while its tail is still in L2, with one block per SM so the rows in flight fit
// in L2; the loss-and-gradient kernel does both passes in place). Targets are validated by the
// row kernels (the smallest bad row is flagged for the host). Sum/mean reduce per-row losses in
// one block in a fixed order.
#include "core/cuda/fused_common.cuh"
#include "core/cuda/loss.cuh"

namespace kiln::cuda {
namespace {

using namespace fused;

constexpr int kStreamUnroll = 3;  // forward: packs per thread per step, double-buffered
constexpr int kSweepUnroll = 4;   // backward: packs per thread per step, loaded then used

// Adds VEC values to a running (max m, sum s of exp(x - m)).
template <class C, int VEC>
__device__ __forceinline__ void lse_add(C& m, C& s, const C (&a)[VEC]) {
  C vm = a[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vm = a[k] > vm ? a[k] : vm;
  if (vm > m) {
    s = s == C(0) ? C(0) : s * fast_exp(m - vm);
    m = vm;
  }
  if (m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += fast_exp(a[k] - m);
  }
}

// Merges two (max, sum) pairs.
template <class C>
__device__ __forceinline__ void merge_lse(C& m, C& s, C m2, C s2) {
  const C mm = m > m2 ? m : m2;
  if (mm == -INFINITY) return;  // both empty
  s = (m == mm ? s : s * fast_exp(m - mm)) + (m2 == mm ? s2 : s2 * fast_exp(m2 - mm));
  m = mm;
}

template <class C>
__device__ void block_lse(C& m, C& s, C* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const C m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge_lse(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    red[warp] = m;
    red[32 + warp] = s;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0;
  for (int i = 0; i < nw; ++i) merge_lse(m, s, red[i], red[32 + i]);
}

// Streams the vectors of a row through registers: kStreamUnroll packs per thread per step, the next
// step's packs loaded before the current ones are used (double buffering keeps loads in flight).
// Step j of the walk reads row vector index(j); fn(index, pack) sees each vector once.
template <int VEC, class T, class Index, class Fn>
__device__ __forceinline__ void stream_row(const T* row, int64_t nvec, int64_t s1, Index index, Fn&& fn) {
  const int64_t bd = blockDim.x, step = kStreamUnroll * bd;
  Pack<T, VEC> cur[kStreamUnroll], nxt[kStreamUnroll];
  auto load = [&](int64_t base, Pack<T, VEC>(&pk)[kStreamUnroll]) {
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      if (base + u * bd < nvec) pk[u] = load_pack<VEC>(vec_at<VEC>(row, index(base + u * bd), s1));
    }
  };
  int64_t base = threadIdx.x;
  if (base < nvec) load(base, cur);
  for (; base < nvec; base += step) {
    if (base + step < nvec) load(base + step, nxt);
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      if (base + u * bd < nvec) fn(index(base + u * bd), cur[u]);
    }
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) cur[u] = nxt[u];
  }
}

// (max, sum of exp(x - max)) of one row of v logits (element stride s1 when VEC == 1), for the block;
// the row walked with stream_row (STREAM) or kSweepUnroll packs at a time.
// With SUM, `total` gets the row's sum as well (for label smoothing).
template <class T, int VEC, bool STREAM, bool SUM = false>
__device__ void row_lse(const T* row, int64_t v, int64_t s1, device_compute_t<T>& m, device_compute_t<T>& s,
                        device_compute_t<T>* red, device_compute_t<T>* total = nullptr) {
  using C = device_compute_t<T>;
  m = -INFINITY;
  s = 0;
  C part = 0;  // this thread's share of the row sum (SUM only)
  auto add_sum = [&](const C* a, int count) {
    if constexpr (SUM) {
      for (int k = 0; k < count; ++k) part += a[k];
    }
  };
  const int64_t nvec = v / VEC;
  if constexpr (STREAM) {
    stream_row<VEC>(row, nvec, s1, [](int64_t j) { return j; }, [&](int64_t, const Pack<T, VEC>& pk) {
      C a[VEC];
      unpack(pk, a);
      lse_add(m, s, a);
    });
  } else {  // kSweepUnroll packs loaded, then used: fewer registers, no double buffering
    const int64_t bd = blockDim.x;
    int64_t vi = threadIdx.x;
    for (; vi + (kSweepUnroll - 1) * bd < nvec; vi += kSweepUnroll * bd) {
      Pack<T, VEC> pk[kSweepUnroll];
#pragma unroll
      for (int u = 0; u < kSweepUnroll; ++u) pk[u] = load_pack<VEC>(vec_at<VEC>(row, vi + u * bd, s1));
#pragma unroll
      for (int u = 0; u < kSweepUnroll; ++u) {
        C a[VEC];
        unpack(pk[u], a);
        lse_add(m, s, a);
        add_sum(a, VEC);
      }
    }
    for (; vi < nvec; vi += bd) {
      C a[VEC];
      unpack(load_pack<VEC>(vec_at<VEC>(row, vi, s1)), a);
      lse_add(m, s, a);
      add_sum(a, VEC);
    }
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < v; j += blockDim.x) {  // the tail when VEC does not divide v
    const C a[1] = {static_cast<C>(to_compute(row[j]))};
    lse_add(m, s, a);
    add_sum(a, 1);
  }
  block_lse(m, s, red);
  if constexpr (SUM) *total = block_sum(part, red);
}

// Walks a row's vectors from its end (the end was read last by the statistics pass, so it is the likeliest
// still in L2), kSweepUnroll packs loaded then used (without double buffering: with one 1024-thread block
// per SM that measured faster on the H200); fn(vector index, pack) sees each vector once.
template <int VEC, class T, class Fn>
__device__ __forceinline__ void sweep_row_reverse(const T* row, int64_t nvec, int64_t s1, Fn&& fn) {
  const int64_t bd = blockDim.x;
  int64_t k = threadIdx.x;
  for (; k + (kSweepUnroll - 1) * bd < nvec; k += kSweepUnroll * bd) {
    Pack<T, VEC> pk[kSweepUnroll];
#pragma unroll
    for (int u = 0; u < kSweepUnroll; ++u) pk[u] = load_pack<VEC>(vec_at<VEC>(row, nvec - 1 - (k + u * bd), s1));
#pragma unroll
    for (int u = 0; u < kSweepUnroll; ++u) fn(nvec - 1 - (k + u * bd), pk[u]);
  }
  for (; k < nvec; k += bd) fn(nvec - 1 - k, load_pack<VEC>(vec_at<VEC>(row, nvec - 1 - k, s1)));
}

template <class T, class I, int VEC>
__global__ void __launch_bounds__(1024) cross_entropy_kernel(const T* __restrict__ logits, int64_t n, int64_t v, int64_t s0, int64_t s1,
                                     const I* __restrict__ targets, int64_t ts, int64_t ignore,
                                     device_compute_t<T>* __restrict__ loss, unsigned long long* err) {
  using C = device_compute_t<T>;
  __shared__ C red[64];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t t = static_cast<int64_t>(targets[r * ts]);
    if (t == ignore || t < 0 || t >= v) {
      if (threadIdx.x == 0) {
        loss[r] = 0;
        if (t != ignore) record_error(err, r);
      }
      continue;
    }
    const T* row = logits + r * s0;
    C m, s;
    row_lse<T, VEC, true>(row, v, s1, m, s, red);
    if (threadIdx.x == 0) loss[r] = m + log(s) - static_cast<C>(to_compute(row[t * s1]));
  }
}

// reduction 0 (none): out[r] = loss[r]; 1 (sum) / 2 (mean): out[0] = the sum in f64 (divided by
// the count of non-ignored rows, 0 when there is none), by one block.
template <class T, class I>
__global__ void cross_entropy_reduce(const device_compute_t<T>* __restrict__ loss, const I* __restrict__ targets,
                                     int64_t ts, int64_t n, int64_t ignore, int reduction, T* __restrict__ out) {
  using C = device_compute_t<T>;
  if (reduction == 0) {
    for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
         r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[r] = from_compute<T>(loss[r]);
    }
    return;
  }
  __shared__ double red[64];
  double total = 0, count = 0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    total += static_cast<double>(loss[r]);
    count += static_cast<int64_t>(targets[r * ts]) != ignore ? 1.0 : 0.0;
  }
  block_sum2(total, count, red);
  if (reduction == 2) total = count == 0 ? 0.0 : total / count;
  if (threadIdx.x == 0) out[0] = from_compute<T>(static_cast<C>(total));
}

// The number of non-ignored targets (the mean's divisor).
template <class I, class C>
__global__ void count_targets(const I* __restrict__ targets, int64_t ts, int64_t n, int64_t ignore, C* count) {
  __shared__ C red[64];
  C c = 0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) c += static_cast<int64_t>(targets[r * ts]) != ignore ? 1 : 0;
  c = block_sum(c, red);
  if (threadIdx.x == 0) *count = c;
}

// dlogits row = (softmax - onehot(t)) * scale, zero for ignored (or invalid, flagged) rows. The
// output is contiguous: with VEC > 1 its rows are 16-byte aligned too.
template <class T, class I, int VEC>
__global__ void __launch_bounds__(1024) cross_entropy_backward_kernel(const T* __restrict__ logits, int64_t n, int64_t v, int64_t s0,
                                              int64_t s1, const I* __restrict__ targets, int64_t ts, int64_t ignore,
                                              int reduction, const device_compute_t<T>* __restrict__ grad,
                                              int64_t gstride, const device_compute_t<T>* __restrict__ count,
                                              T* __restrict__ out, unsigned long long* err) {
  using C = device_compute_t<T>;
  __shared__ C red[64];
  const int64_t nvec = v / VEC, bd = blockDim.x;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    T* orow = out + r * v;
    const int64_t t = static_cast<int64_t>(targets[r * ts]);
    if (t == ignore || t < 0 || t >= v) {
      if (threadIdx.x == 0 && t != ignore) record_error(err, r);
      C z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = 0;
      for (int64_t vi = threadIdx.x; vi < nvec; vi += bd) store_vec<VEC>(orow + vi * VEC, z);
      for (int64_t j = nvec * VEC + threadIdx.x; j < v; j += bd) orow[j] = from_compute<T>(C(0));
      continue;
    }
    const T* row = logits + r * s0;
    C m, s;
    row_lse<T, VEC, false>(row, v, s1, m, s, red);
    const C lse = m + log(s);
    C scale = reduction == 0 ? grad[r * gstride] : grad[0];
    if (reduction == 2) scale /= *count;
    auto emit = [&](int64_t vi, const Pack<T, VEC>& pk) {
      C a[VEC];
      unpack(pk, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) a[k] = (fast_exp(a[k] - lse) - (vi * VEC + k == t ? C(1) : C(0))) * scale;
      store_vec<VEC>(orow + vi * VEC, a);
    };
    sweep_row_reverse<VEC>(row, nvec, s1, emit);
    for (int64_t j = nvec * VEC + threadIdx.x; j < v; j += bd) {
      orow[j] = from_compute<T>((fast_exp(static_cast<C>(to_compute(row[j])) - lse) - (j == t ? C(1) : C(0))) * scale);
    }
  }
}

// Loss and gradient of one row per block, in place: `rows` (n, v) contiguous holds the logits and
// receives scale * (softmax (1 + 2 z lse) - s / v - (1 - s) onehot(t)); loss[r] = (1 - s)(lse - x_t)
// + s(lse - mean) + z lse^2 (0 and a zero row for ignored targets). Every thread reads x_t before the
// statistics pass, whose closing barrier orders all reads of the row before any write to it.
template <class T, class I, int VEC>
__global__ void __launch_bounds__(1024) cross_entropy_loss_grad_kernel(T* rows, int64_t n, int64_t v,
                                                                       const I* __restrict__ targets, int64_t ts,
                                                                       int64_t ignore, const device_compute_t<T>* scale_ptr,
                                                                       device_compute_t<T> smoothing,
                                                                       device_compute_t<T> z,
                                                                       device_compute_t<T>* __restrict__ loss) {
  using C = device_compute_t<T>;
  __shared__ C red[64];
  const int64_t nvec = v / VEC, bd = blockDim.x;
  const C scale = *scale_ptr, uniform = smoothing / static_cast<C>(v);
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    T* row = rows + r * v;
    const int64_t t = static_cast<int64_t>(targets[r * ts]);
    if (t == ignore) {
      if (threadIdx.x == 0) loss[r] = 0;
      C zero[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) zero[k] = 0;
      for (int64_t vi = threadIdx.x; vi < nvec; vi += bd) store_vec<VEC>(row + vi * VEC, zero);
      for (int64_t j = nvec * VEC + threadIdx.x; j < v; j += bd) row[j] = from_compute<T>(C(0));
      continue;
    }
    const C xt = static_cast<C>(to_compute(row[t]));
    C m, s, total = 0;
    if (smoothing != C(0)) {
      row_lse<T, VEC, false, true>(row, v, 1, m, s, red, &total);
    } else {
      row_lse<T, VEC, false>(row, v, 1, m, s, red);
    }
    const C lse = m + log(s);
    if (threadIdx.x == 0) {
      loss[r] = (1 - smoothing) * (lse - xt) + smoothing * (lse - total / static_cast<C>(v)) + z * lse * lse;
    }
    const C gain = 1 + 2 * z * lse;
    auto grad = [&](C x, int64_t j) { return (fast_exp(x - lse) * gain - uniform - (j == t ? 1 - smoothing : C(0))) * scale; };
    auto emit = [&](int64_t vi, const Pack<T, VEC>& pk) {
      C a[VEC];
      unpack(pk, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) a[k] = grad(a[k], vi * VEC + k);
      store_vec<VEC>(row + vi * VEC, a);
    };
    sweep_row_reverse<VEC>(row, nvec, 1, emit);
    for (int64_t j = nvec * VEC + threadIdx.x; j < v; j += bd) row[j] = from_compute<T>(grad(static_cast<C>(to_compute(row[j])), j));
    __syncthreads();  // the next row's statistics reuse `red`
  }
}

template <class T>
bool logits_vectorisable(const void* logits, int64_t v, int64_t s0, int64_t s1) {
  return s1 == 1 && aligned16(logits) && (s0 * static_cast<int64_t>(sizeof(T))) % 16 == 0 && v >= vec_of<T>();
}

// Threads per row: a power of two in [32, most], about 2 * unroll vectors or more each.
int ce_threads(int64_t nvec, int unroll, int most) {
  int t = 32;
  while (t < most && static_cast<int64_t>(t) * unroll * 2 < nvec) t *= 2;
  return t;
}

// Grid and block of the row sweeps (backward, loss-and-gradient): rows in flight about 1024 threads'
// worth per SM, so their logits stay in L2 for the second read.
struct SweepLaunch {
  int threads, grid;
};
SweepLaunch sweep_launch(int64_t n, int64_t nvec) {
  const int threads = ce_threads(nvec, kSweepUnroll, 1024);
  const int64_t blocks = static_cast<int64_t>(sm_count()) * (1024 / threads);
  return {threads, static_cast<int>(n < blocks ? n : blocks)};
}

}  // namespace

size_t cross_entropy_workspace(DType dt, int64_t n) { return static_cast<size_t>(n + 1) * (dt == DType::f64 ? 8 : 4); }

cudaError_t launch_cross_entropy(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v, int64_t s0,
                                 int64_t s1, const void* targets, int64_t ts, int64_t ignore_index, int reduction,
                                 void* out, void* workspace, unsigned long long* err, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = device_compute_t<T>;
    return visit_index(target_dt, [&](auto itag) {
      using I = typename decltype(itag)::type;
      auto* loss = static_cast<C*>(workspace);  // (n)
      const auto* tp = static_cast<const I*>(targets);
      if (n > 0) {
        const bool vec = logits_vectorisable<T>(logits, v, s0, s1);
        const int threads = ce_threads(vec ? v / vec_of<T>() : v, kStreamUnroll, 512);  // 2 rows per SM
        const int grid = static_cast<int>(n < kMaxGrid ? n : kMaxGrid);
        if (vec) {
          cross_entropy_kernel<T, I, vec_of<T>()><<<grid, threads, 0, s>>>(static_cast<const T*>(logits), n, v, s0,
                                                                          s1, tp, ts, ignore_index, loss, err);
        } else {
          cross_entropy_kernel<T, I, 1><<<grid, threads, 0, s>>>(static_cast<const T*>(logits), n, v, s0, s1, tp, ts,
                                                                 ignore_index, loss, err);
        }
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
      }
      if (reduction == 0) {
        if (n == 0) return cudaSuccess;
        cross_entropy_reduce<T, I><<<grid_for(n, kThreads), kThreads, 0, s>>>(loss, tp, ts, n, ignore_index, 0,
                                                                              static_cast<T*>(out));
      } else {
        cross_entropy_reduce<T, I><<<1, 1024, 0, s>>>(loss, tp, ts, n, ignore_index, reduction, static_cast<T*>(out));
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_cross_entropy_backward(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v,
                                          int64_t s0, int64_t s1, const void* targets, int64_t ts, int64_t ignore_index,
                                          int reduction, const void* grad, int64_t gstride, void* out, void* workspace,
                                          unsigned long long* err, void* stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = device_compute_t<T>;
    return visit_index(target_dt, [&](auto itag) {
      using I = typename decltype(itag)::type;
      const auto* tp = static_cast<const I*>(targets);
      auto* count = static_cast<C*>(workspace);
      if (reduction == 2) {
        count_targets<I, C><<<1, 1024, 0, s>>>(tp, ts, n, ignore_index, count);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
      }
      const bool vec = logits_vectorisable<T>(logits, v, s0, s1) && aligned16(out) &&
                       (v * static_cast<int64_t>(sizeof(T))) % 16 == 0;
      const auto [threads, grid] = sweep_launch(n, vec ? v / vec_of<T>() : v);
      const auto* gp = static_cast<const C*>(grad);
      if (vec) {
        cross_entropy_backward_kernel<T, I, vec_of<T>()><<<grid, threads, 0, s>>>(
            static_cast<const T*>(logits), n, v, s0, s1, tp, ts, ignore_index, reduction, gp, gstride, count,
            static_cast<T*>(out), err);
      } else {
        cross_entropy_backward_kernel<T, I, 1><<<grid, threads, 0, s>>>(static_cast<const T*>(logits), n, v, s0, s1,
                                                                        tp, ts, ignore_index, reduction, gp, gstride,
                                                                        count, static_cast<T*>(out), err);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_cross_entropy_loss_grad(DType dt, DType target_dt, void* logits, int64_t n, int64_t v,
                                           const void* targets, int64_t ts, int64_t ignore_index, const void* scale,
                                           double label_smoothing, double z_loss_weight, void* loss, void* stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = device_compute_t<T>;
    return visit_index(target_dt, [&](auto itag) {
      using I = typename decltype(itag)::type;
      const bool vec = logits_vectorisable<T>(logits, v, v, 1);
      const auto [threads, grid] = sweep_launch(n, vec ? v / vec_of<T>() : v);
      auto* rows = static_cast<T*>(logits);
      const auto* tp = static_cast<const I*>(targets);
      const auto* sp = static_cast<const C*>(scale);
      const C sm = static_cast<C>(label_smoothing), zl = static_cast<C>(z_loss_weight);
      auto* lp = static_cast<C*>(loss);
      if (vec) {
        cross_entropy_loss_grad_kernel<T, I, vec_of<T>()><<<grid, threads, 0, s>>>(rows, n, v, tp, ts, ignore_index, sp,
                                                                                   sm, zl, lp);
      } else {
        cross_entropy_loss_grad_kernel<T, I, 1><<<grid, threads, 0, s>>>(rows, n, v, tp, ts, ignore_index, sp, sm, zl, lp);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace kiln::cuda

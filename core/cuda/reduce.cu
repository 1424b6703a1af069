// CUDA reductions: one engine (an accumulator op per reduction kind) with a row kernel (threads along
// the reduction, 16-byte loads on contiguous rows, warp shuffles) and a column kernel (threads along
// adjacent outputs), optional split over blocks (one resident wave) with a fixed-order combine; plus
// softmax rows (long ones held in registers by a thread-block cluster, read once).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/cuda/dtype.cuh"
#include "core/cuda/elementwise.cuh"
#include "core/cuda/indexer.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"
#include "core/cuda/reduce.cuh"
#include "core/functors.h"

namespace kiln::cuda {
namespace {

constexpr int kMaxThreads = 512;      // threads per block of the reduction kernels (128 registers each)
constexpr int kSoftmaxThreads = 1024;  // threads per block of the softmax row kernel
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread on contiguous rows

template <class C> constexpr C kInf = std::numeric_limits<C>::infinity();
template <class C> constexpr C kNaN = std::numeric_limits<C>::quiet_NaN();

template <class C> __device__ __forceinline__ bool is_nan(C v) { return v != v; }
template <class C> __device__ __forceinline__ bool is_finite(C v) {
  if constexpr (std::is_floating_point_v<C>) {
    return v - v == C(0);  // false for +-inf and NaN
  } else {
    return true;
  }
}

// exp for the softmax family: one MUFU.EX2 of x * log2(e) (about 2 ulp; subnormal results flushed to
// 0) in float; exact in double.
template <class C> __device__ __forceinline__ C fast_exp(C x) {
  if constexpr (std::is_same_v<C, float>) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
  } else {
    return fn::exp(x);
  }
}

// Butterfly exchange of any 4-byte-multiple accumulator across a warp.
template <class A> __device__ __forceinline__ A shfl_xor(const A& a, int mask) {
  static_assert(sizeof(A) % 4 == 0, "accumulators are whole 32-bit words");
  constexpr int kWords = sizeof(A) / 4;
  union {
    A acc;
    int w[kWords];
  } u{a};
#pragma unroll
  for (int k = 0; k < kWords; ++k) u.w[k] = __shfl_xor_sync(0xffffffffu, u.w[k], mask);
  return u.acc;
}

struct Outs {
  void* out;
  void* out2;
};

// ---- accumulator ops: init, step (one element at reduction position p), merge, store

// Sum (and mean): float for f32/bf16/f16, double for f64, wrapping u64 for ints/bool.
template <class T> struct SumOp {
  using C = device_compute_t<T>;
  using Acc = std::conditional_t<std::is_integral_v<C>, uint64_t, C>;
  bool mean = false;
  int64_t n = 0;  // reduced elements (mean: 0 gives NaN, as 0 / 0)
  __device__ Acc init() const { return Acc(0); }
  __device__ Acc step(Acc a, T v, int64_t) const { return a + static_cast<Acc>(to_compute(v)); }
  __device__ Acc merge(Acc a, Acc b) const { return a + b; }
  __device__ void store(const Outs& o, int64_t i, Acc a) const {
    if constexpr (std::is_integral_v<C>) {
      static_cast<int64_t*>(o.out)[i] = static_cast<int64_t>(a);
    } else {
      static_cast<T*>(o.out)[i] = from_compute<T>(mean ? a / static_cast<Acc>(n) : a);
    }
  }
};

// Maximum (minimum) in the compute type; NaN wins.
template <class T, bool Max> struct ExtremeOp {
  using C = device_compute_t<T>;
  using Acc = C;
  __device__ Acc init() const {
    if constexpr (std::is_floating_point_v<C>) {
      return Max ? -kInf<C> : kInf<C>;
    } else {
      return Max ? std::numeric_limits<C>::lowest() : std::numeric_limits<C>::max();
    }
  }
  __device__ Acc merge(Acc a, Acc b) const { return ((Max ? b > a : b < a) || is_nan(b)) ? b : a; }
  __device__ Acc step(Acc a, T v, int64_t) const { return merge(a, to_compute(v)); }
  __device__ void store(const Outs& o, int64_t i, Acc a) const { static_cast<T*>(o.out)[i] = from_compute<T>(a); }
};

// First position of the maximum; NaN counts as the maximum. Merge is order-free: ties take the
// smaller position.
template <class C> struct ArgAcc {
  C v;
  int64_t i;
};
template <class T> struct ArgMaxOp {
  using C = device_compute_t<T>;
  using Acc = ArgAcc<C>;
  __device__ static bool better(C v, C best) { return v > best || (is_nan(v) && !is_nan(best)); }
  __device__ Acc init() const { return {C(0), -1}; }
  __device__ Acc step(Acc a, T x, int64_t p) const {  // positions arrive in increasing order
    const C v = to_compute(x);
    return (a.i < 0 || better(v, a.v)) ? Acc{v, p} : a;
  }
  __device__ Acc merge(Acc a, Acc b) const {
    if (b.i < 0) return a;
    if (a.i < 0 || better(b.v, a.v)) return b;
    if (better(a.v, b.v)) return a;
    return b.i < a.i ? b : a;
  }
  __device__ void store(const Outs& o, int64_t i, Acc a) const { static_cast<int64_t*>(o.out)[i] = a.i; }
};

// Online (maximum m, sum of exp(x - m)). A non-finite m decides the result alone (s is then unused).
template <class C> struct LseAcc {
  C m, s;
};
enum class LseOut { logsumexp, softmax_stats, log_softmax_stats };
template <class T, LseOut OUT> struct LseOp {
  using C = device_compute_t<T>;
  using Acc = LseAcc<C>;
  __device__ Acc init() const { return {-kInf<C>, C(0)}; }
  __device__ Acc step(Acc a, T v, int64_t) const {
    const C x = to_compute(v);
    if (x > a.m) {
      a.s = a.s * fast_exp(a.m - x) + C(1);  // exp(-inf) = 0 for the first finite element
      a.m = x;
    } else if (is_nan(x)) {
      a.m = x;
    } else if (x != -kInf<C>) {
      a.s += fast_exp(x - a.m);
    }
    return a;
  }
  // V elements at once: one rescale per pack, then one exp per element.
  template <int V> __device__ Acc step_pack(Acc a, const Pack<T, V>& pk, int64_t) const {
    C v[V];
    C mx = -kInf<C>;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = to_compute(pk.v[j]);
      mx = (v[j] > mx || is_nan(v[j])) ? v[j] : mx;
    }
    if (mx > a.m || is_nan(mx)) {
      a.s = a.m == -kInf<C> ? C(0) : a.s * fast_exp(a.m - mx);
      a.m = mx;
    }
    if (!is_finite(a.m)) return a;  // all -inf so far, or decided by +inf / NaN
#pragma unroll
    for (int j = 0; j < V; ++j) a.s += fast_exp(v[j] - a.m);
    return a;
  }
  __device__ Acc merge(Acc a, Acc b) const {
    const C m = (b.m > a.m || is_nan(b.m)) ? b.m : a.m;
    if (!is_finite(m)) return {m, C(0)};
    const C sa = a.m == -kInf<C> ? C(0) : a.s * fast_exp(a.m - m);
    const C sb = b.m == -kInf<C> ? C(0) : b.s * fast_exp(b.m - m);
    return {m, sa + sb};
  }
  // softmax = exp(x - shift) * scale, log_softmax = (x - shift) - scale; an all -inf row gives 0 / -inf,
  // a row holding +inf or NaN gives NaN (as the CPU kernel).
  __device__ static void stats(Acc a, C& shift, C& scale) {
    const bool finite = is_finite(a.m);
    shift = finite ? a.m : C(0);
    if (a.m == -kInf<C>) {
      scale = C(0);
    } else if (!finite) {
      scale = kNaN<C>;
    } else {
      scale = OUT == LseOut::log_softmax_stats ? fn::log(a.s) : C(1) / a.s;
    }
  }
  __device__ void store(const Outs& o, int64_t i, Acc a) const {
    if constexpr (OUT == LseOut::logsumexp) {
      static_cast<T*>(o.out)[i] = from_compute<T>(is_finite(a.m) ? a.m + fn::log(a.s) : a.m);
    } else {
      stats(a, static_cast<C*>(o.out)[i], static_cast<C*>(o.out2)[i]);
    }
  }
};

// ---- kernels

struct Geometry {
  Indexer<1> outer, red;
  int64_t n_out, n_red, chunk_len, chunks;
  bool contiguous;  // the reduction is one run of stride 1
};

// One pack of V elements at positions p.. : the op's step_pack where it has one, else V steps.
template <class Op, int V, class T>
__device__ __forceinline__ typename Op::Acc step_pack(const Op& op, typename Op::Acc a, const Pack<T, V>& pk, int64_t p) {
  if constexpr (requires { op.template step_pack<V>(a, pk, p); }) {
    return op.template step_pack<V>(a, pk, p);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) a = op.step(a, pk.v[j], p + j);
    return a;
  }
}

// Folds positions [b, e) of a contiguous row into a: thread t of nt takes groups of V adjacent
// elements, kUnroll 16-byte loads in flight when the row is aligned. Each thread sees its positions
// in increasing order, in the same groups whatever the alignment, so results do not depend on it.
// b is a multiple of V.
template <int V, class T, class Op>
__device__ __forceinline__ void walk_row(const T* row, int64_t b, int64_t e, int t, int nt, const Op& op,
                                         typename Op::Acc& a) {
  const int64_t stride = static_cast<int64_t>(nt) * V;
  int64_t g = b + static_cast<int64_t>(t) * V;
  if (aligned16(row + b)) {
    for (; g + (kUnroll - 1) * stride + V <= e; g += kUnroll * stride) {
      Pack<T, V> pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u] = *reinterpret_cast<const Pack<T, V>*>(row + g + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) a = step_pack(op, a, pk[u], g + u * stride);
    }
    for (; g + V <= e; g += stride) a = step_pack(op, a, *reinterpret_cast<const Pack<T, V>*>(row + g), g);
  }
  for (; g + V <= e; g += stride) {  // unaligned rows: the same packs, loaded element by element
    Pack<T, V> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = row[g + j];
    a = step_pack(op, a, pk, g);
  }
  for (; g < e; g += stride) {
    for (int j = 0; j < V && g + j < e; ++j) a = op.step(a, row[g + j], g + j);
  }
}

// Merges the accumulators of the threadIdx.x lanes of each threadIdx.y row (blockDim.x a multiple of
// 32); the result is valid in threadIdx.x == 0. Every thread of the block must call it.
template <class Op, class Acc = typename Op::Acc>
__device__ __forceinline__ Acc merge_rows(const Op& op, Acc a, Acc* part) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) a = op.merge(a, shfl_xor(a, m));
  const int bx = blockDim.x;
  if (bx > 32) {
    const int warp = (threadIdx.y * bx + threadIdx.x) / 32;
    if ((threadIdx.x & 31) == 0) part[warp] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < bx / 32; ++w) a = op.merge(a, part[warp + w]);
    }
  }
  return a;
}

// Threads of a row (x) walk one output's reduction; blockDim.y outputs per block; chunk blockIdx.y.
template <int V, class T, class Op>
__global__ void __launch_bounds__(kMaxThreads)
    reduce_rows_kernel(const T* __restrict__ x, Geometry g, Op op, Outs outs, typename Op::Acc* ws) {
  using Acc = typename Op::Acc;
  __shared__ Acc part[32];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * g.chunk_len;
  const int64_t e = min(g.n_red, b + g.chunk_len);
  Acc a = op.init();
  if (o < g.n_out) {
    const T* row = x + g.outer.offset(o);
    if (g.contiguous) {
      walk_row<V>(row, b, e, threadIdx.x, blockDim.x, op, a);
    } else {
      for (int64_t p = b + threadIdx.x; p < e; p += blockDim.x) a = op.step(a, row[g.red.offset(p)], p);
    }
  }
  a = merge_rows(op, a, part);
  if (threadIdx.x == 0 && o < g.n_out) {
    if (g.chunks == 1) {
      op.store(outs, o, a);
    } else {
      ws[blockIdx.y * g.n_out + o] = a;
    }
  }
}

constexpr int kColumnsMaxY = 16;

// Thread x of a block owns the VC adjacent outputs from (blockIdx.x * 32 + x) * VC (adjacent in memory:
// coalesced, VC at a time); the blockDim.y threads of a column split its reduction, merged through
// shared memory in a fixed order.
template <int VC, class T, class Op>
__global__ void __launch_bounds__(32 * kColumnsMaxY)
    reduce_columns_kernel(const T* __restrict__ x, Geometry g, Op op, Outs outs, typename Op::Acc* ws) {
  using Acc = typename Op::Acc;
  __shared__ Acc part[kColumnsMaxY][32 * VC];
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VC;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * g.chunk_len;
  const int64_t e = min(g.n_red, b + g.chunk_len);
  Acc a[VC];
#pragma unroll
  for (int v = 0; v < VC; ++v) a[v] = op.init();
  if (o < g.n_out) {
    const T* base = x + g.outer.offset(o);
    auto load = [&](int64_t off) { return *reinterpret_cast<const Pack<T, VC>*>(base + off); };
    auto fold = [&](const Pack<T, VC>& pk, int64_t p) {
#pragma unroll
      for (int v = 0; v < VC; ++v) a[v] = op.step(a[v], pk.v[v], p);
    };
    const int64_t ps = blockDim.y;
    if (g.red.ndim <= 1) {  // one reduced dim: kUnroll loads in flight
      const int64_t s = g.red.ndim == 0 ? 0 : g.red.stride[0][0];
      int64_t p = b + threadIdx.y;
      for (; p + (kUnroll - 1) * ps < e; p += kUnroll * ps) {
        Pack<T, VC> pk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) pk[u] = load((p + u * ps) * s);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) fold(pk[u], p + u * ps);
      }
      for (; p < e; p += ps) fold(load(p * s), p);
    } else {
      for (int64_t p = b + threadIdx.y; p < e; p += ps) fold(load(g.red.offset(p)), p);
    }
  }
  if (blockDim.y > 1) {
#pragma unroll
    for (int v = 0; v < VC; ++v) part[threadIdx.y][threadIdx.x * VC + v] = a[v];
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int j = 1; j < static_cast<int>(blockDim.y); ++j) {
#pragma unroll
        for (int v = 0; v < VC; ++v) a[v] = op.merge(a[v], part[j][threadIdx.x * VC + v]);
      }
    }
  }
  if (threadIdx.y == 0 && o < g.n_out) {
#pragma unroll
    for (int v = 0; v < VC; ++v) {
      if (g.chunks == 1) {
        op.store(outs, o + v, a[v]);
      } else {
        ws[blockIdx.y * g.n_out + o + v] = a[v];
      }
    }
  }
}

// Merges the (chunks, n_out) partials of each output in chunk order.
template <class Op>
__global__ void combine_kernel(const typename Op::Acc* __restrict__ ws, int64_t n_out, int64_t chunks, Op op, Outs outs) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < n_out; o += step) {
    typename Op::Acc a = ws[o];
    for (int64_t c = 1; c < chunks; ++c) a = op.merge(a, ws[c * n_out + o]);
    op.store(outs, o, a);
  }
}

// 16-byte streaming (evict-first) load and store: the last use of a row, and an output not read soon.
template <class T, int V> __device__ __forceinline__ Pack<T, V> load_last(const T* p) {
  const int4 r = __ldcs(reinterpret_cast<const int4*>(p));
  return *reinterpret_cast<const Pack<T, V>*>(&r);
}
template <class T, int V> __device__ __forceinline__ void store_streaming(T* p, const Pack<T, V>& v) {
  __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
}

// softmax / log_softmax of contiguous rows: statistics in one pass (online max and sum, 16-byte loads),
// then a second pass writing y, which finds the row in L2 when few enough rows are in flight (the
// launcher sizes the grid so; blocks loop over rows). blockDim.x threads per row, blockDim.y rows per
// block.
template <int V, class T, bool Log>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(const T* __restrict__ x, Indexer<1> outer, int64_t rows, int64_t len, T* __restrict__ y) {
  using Op = LseOp<T, Log ? LseOut::log_softmax_stats : LseOut::softmax_stats>;
  using C = typename Op::C;
  using Acc = typename Op::Acc;
  __shared__ Acc part[32];
  __shared__ C stats[32][2];  // (rows per block, {shift, scale})
  const Op op;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t r = r0 + threadIdx.y;
    const bool active = r < rows;
    const T* xr = x + (active ? outer.offset(r) : 0);  // (len)
    T* yr = y + (active ? r : 0) * len;                // (len)
    Acc a = op.init();
    if (active) walk_row<V>(xr, 0, len, threadIdx.x, blockDim.x, op, a);
    a = merge_rows(op, a, part);
    if (threadIdx.x == 0) Op::stats(a, stats[threadIdx.y][0], stats[threadIdx.y][1]);
    __syncthreads();
    if (!active) continue;
    const C shift = stats[threadIdx.y][0], scale = stats[threadIdx.y][1];
    auto f = [&](T v) {
      const C d = to_compute(v) - shift;
      return from_compute<T>(Log ? d - scale : fast_exp(d) * scale);
    };
    auto apply = [&](const Pack<T, V>& in, T* dst) {
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = f(in.v[j]);
      store_streaming(dst, out);
    };
    const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
    int64_t g = static_cast<int64_t>(threadIdx.x) * V;
    if (aligned16(xr) && aligned16(yr)) {
      for (; g + (kUnroll - 1) * stride + V <= len; g += kUnroll * stride) {  // kUnroll loads in flight
        Pack<T, V> in[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) in[u] = load_last<T, V>(xr + g + u * stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) apply(in[u], yr + g + u * stride);
      }
      for (; g + V <= len; g += stride) apply(load_last<T, V>(xr + g), yr + g);
    }
    for (; g < len; g += stride) {
      for (int j = 0; j < V && g + j < len; ++j) yr[g + j] = f(xr[g + j]);
    }
  }
}

// ---- softmax rows held in registers by a thread-block cluster

constexpr int kResThreads = 512;   // threads per CTA (2 CTAs per multiprocessor)
constexpr int kResMaxCluster = 8;  // the portable cluster size

// 16-byte packs per thread (f64 holds fewer: its exp needs the registers).
template <class T> constexpr int res_items() { return sizeof(T) == 8 ? 4 : 8; }

// Hides a register-held pack's value from the compiler, so values unpacked from it earlier are not
// kept alive (in more registers) for reuse: each pass unpacks again.
__device__ __forceinline__ void launder(int4& r) { asm volatile("" : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)); }

// softmax / log_softmax of rows whose length is a multiple of the pack (rows 16-byte aligned in x
// and y), each split over the k CTAs of a cluster, `per` packs per CTA, held in registers: x is read
// once. The (max, sum) accumulators are merged in the block, then across the cluster in rank order
// through distributed shared memory, so every CTA gets the same statistics.
template <class T, bool Log>
__global__ void __launch_bounds__(kResThreads, 2)
    softmax_resident_kernel(const T* __restrict__ x, Indexer<1> outer, int64_t rows, int64_t len, int per,
                            T* __restrict__ y) {
  using Op = LseOp<T, Log ? LseOut::log_softmax_stats : LseOut::softmax_stats>;
  using C = typename Op::C;
  using Acc = typename Op::Acc;
  constexpr int V = static_cast<int>(16 / sizeof(T)), ITEMS = res_items<T>();
  namespace cg = cooperative_groups;
  __shared__ Acc part[32];
  __shared__ Acc mine;  // this CTA's accumulator, read by the cluster
  const cg::cluster_group cluster = cg::this_cluster();
  const int k = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int nvec = static_cast<int>(len / V), beg = rank * per, bd = blockDim.x, tid = threadIdx.x;
  const int end = beg + per < nvec ? beg + per : nvec;
  const Op op;
  bool pending = false;  // arrived at the cluster barrier after reading the others' accumulators
  for (int64_t r = blockIdx.x / k; r < rows; r += gridDim.x / k) {
    const T* xr = x + outer.offset(r);  // (len)
    T* yr = y + r * len;                // (len)
    int4 raw[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int vi = beg + tid + i * bd;
      if (vi < end) raw[i] = __ldcs(reinterpret_cast<const int4*>(xr + static_cast<int64_t>(vi) * V));
    }
    Acc a = op.init();
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (beg + tid + i * bd < end) {
        Pack<T, V> pk;
        memcpy(&pk, &raw[i], sizeof(pk));
        a = op.template step_pack<V>(a, pk, 0);
      }
      launder(raw[i]);
    }
    a = merge_rows(op, a, part);  // valid in thread 0
    if (pending) cluster.barrier_wait();  // the cluster has read `mine` of the previous row
    if (tid == 0) mine = a;
    if (k > 1) {
      cluster.sync();
      a = *cluster.map_shared_rank(&mine, 0);
      for (int c = 1; c < k; ++c) a = op.merge(a, *cluster.map_shared_rank(&mine, c));
      cluster.barrier_arrive();
      pending = true;
    } else {
      __syncthreads();
      a = mine;
      __syncthreads();
    }
    C shift, scale;
    Op::stats(a, shift, scale);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int vi = beg + tid + i * bd;
      if (vi < end) {
        Pack<T, V> pk;
        memcpy(&pk, &raw[i], sizeof(pk));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const C d = to_compute(pk.v[j]) - shift;
          pk.v[j] = from_compute<T>(Log ? d - scale : fast_exp(d) * scale);
        }
        store_streaming(yr + static_cast<int64_t>(vi) * V, pk);
      }
    }
  }
  if (pending) cluster.barrier_wait();  // keep `mine` alive until the cluster has read it
}

template <class T, bool Log>
__global__ void softmax_apply_kernel(int64_t n, Indexer<4> ix, T* __restrict__ y, const T* __restrict__ x,
                                     const device_compute_t<T>* shift, const device_compute_t<T>* scale) {
  using C = device_compute_t<T>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t off[4];
    ix.offsets(i, off);
    const C d = to_compute(x[off[1]]) - shift[off[2]];
    y[off[0]] = from_compute<T>(Log ? d - scale[off[3]] : fast_exp(d) * scale[off[3]]);
  }
}

// ---- host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}
bool is_contiguous_run(const Strided<1>& red) { return red.ndim == 0 || (red.ndim == 1 && red.strides[0][0] == 1); }

template <class T> constexpr bool is_float_v = !std::is_integral_v<device_compute_t<T>>;

// Calls fn(op) with the accumulator op of `kind` for element type T; false where the kind does not
// apply to T (infer() rejects those first).
template <class T, class Fn> bool visit_op(RedOp kind, int64_t n_red, Fn&& fn) {
  switch (kind) {
    case RedOp::sum: fn(SumOp<T>{}); return true;
    case RedOp::max: fn(ExtremeOp<T, true>{}); return true;
    case RedOp::min: fn(ExtremeOp<T, false>{}); return true;
    case RedOp::argmax: fn(ArgMaxOp<T>{}); return true;
    default: break;
  }
  if constexpr (is_float_v<T>) {
    switch (kind) {
      case RedOp::mean: fn(SumOp<T>{true, n_red}); return true;
      case RedOp::logsumexp: fn(LseOp<T, LseOut::logsumexp>{}); return true;
      case RedOp::softmax_stats: fn(LseOp<T, LseOut::softmax_stats>{}); return true;
      case RedOp::log_softmax_stats: fn(LseOp<T, LseOut::log_softmax_stats>{}); return true;
      default: break;
    }
  }
  return false;
}

size_t acc_size(RedOp kind, DType dtype) {
  size_t size = 0;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    visit_op<T>(kind, 1, [&](auto op) { size = sizeof(typename decltype(op)::Acc); });
  });
  return size;
}

// Outputs per thread on the column path: 16-byte (f64, i64) or 4-element packs where every pack of
// adjacent outputs is aligned, else 1.
int column_width(DType dtype, const ReduceLayout& L, const void* x) {
  const int size = static_cast<int>(itemsize(dtype));
  const int vc = size >= 8 ? 2 : 4;
  const Strided<1>& o = L.outer;
  if (o.ndim == 0 || o.strides[0][o.ndim - 1] != 1 || o.shape[o.ndim - 1] % vc != 0) return 1;
  if ((reinterpret_cast<uintptr_t>(x) % static_cast<uintptr_t>(vc * size)) != 0) return 1;
  for (int d = 0; d + 1 < o.ndim; ++d) {
    if (o.strides[0][d] % vc != 0) return 1;
  }
  for (int d = 0; d < L.red.ndim; ++d) {
    if (L.red.strides[0][d] % vc != 0) return 1;
  }
  return vc;
}

// Blocks of `threads` threads of the row kernel for `kind` on dtype resident at once on one
// multiprocessor (4 if the runtime cannot tell).
int rows_blocks_per_sm(RedOp kind, DType dtype, int threads) {
  int n = 0;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = static_cast<int>(16 / sizeof(T));
    visit_op<T>(kind, 1, [&](auto op) {
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, reduce_rows_kernel<V, T, decltype(op)>, threads, 0) !=
          cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
      }
    });
  });
  return n > 0 ? n : 4;
}

}  // namespace

ReducePlan plan_reduce(RedOp kind, DType dtype, const ReduceLayout& L, const void* x) {
  ReducePlan p;
  const int64_t v = static_cast<int64_t>(16 / itemsize(dtype));
  const bool contiguous = is_contiguous_run(L.red);
  const bool outputs_adjacent = L.outer.ndim > 0 && L.outer.strides[0][L.outer.ndim - 1] == 1;
  p.columns = L.n_red <= 8 || (!contiguous && outputs_adjacent);
  int64_t blocks_out = 0, unit = 0;
  if (p.columns) {
    p.bx = 32;
    p.by = L.n_red <= 16 ? 1 : (L.n_red <= 256 ? 4 : kColumnsMaxY);
    p.vc = column_width(dtype, L, x);
    blocks_out = ceil_div(L.n_out, 32 * p.vc);
    unit = p.by;
  } else {
    const int64_t groups = contiguous ? ceil_div(L.n_red, v) : L.n_red;  // per-thread work items
    p.bx = static_cast<int>(std::clamp<int64_t>(pow2_at_least(ceil_div(groups, 4)), 32, 512));
    p.by = std::max(1, 256 / p.bx);
    blocks_out = ceil_div(L.n_out, p.by);
    unit = p.bx * (contiguous ? v : 1);
  }
  // Split long reductions over blocks when the outputs alone do not fill the GPU (one wave: as many
  // blocks as fit at once, about 4 per multiprocessor on the column path), keeping at least 8 items
  // per thread in each piece.
  const int64_t per_sm = p.columns || blocks_out >= 32 * static_cast<int64_t>(sm_count())
                             ? 4 : rows_blocks_per_sm(kind, dtype, p.bx * p.by);
  const int64_t target = per_sm * sm_count();
  p.chunks = 1;
  p.chunk_len = std::max<int64_t>(L.n_red, 1);
  if (blocks_out < target && L.n_red > 8 * unit) {
    const int64_t chunks = std::min(ceil_div(target, blocks_out), L.n_red / (8 * unit));
    if (chunks > 1) {
      p.chunk_len = ceil_div(ceil_div(L.n_red, chunks), unit) * unit;
      if (ceil_div(L.n_red, p.chunk_len) > 65535) p.chunk_len = ceil_div(ceil_div(L.n_red, 65535), unit) * unit;
      p.chunks = ceil_div(L.n_red, p.chunk_len);
    }
  }
  if (p.chunks > 1) p.workspace_bytes = static_cast<size_t>(p.chunks * L.n_out) * acc_size(kind, dtype);
  return p;
}

cudaError_t launch_reduce(RedOp kind, DType dtype, const void* x, const ReduceLayout& L, const ReducePlan& plan,
                          void* out, void* out2, void* workspace, void* stream) {
  if (L.n_out == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  Geometry g{Indexer<1>(L.outer, L.n_out), Indexer<1>(L.red, L.n_red), L.n_out, L.n_red,
             plan.chunk_len, plan.chunks, is_contiguous_run(L.red)};
  const Outs outs{out, out2};
  bool done = false;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = static_cast<int>(16 / sizeof(T));
    const T* xp = static_cast<const T*>(x);
    done = visit_op<T>(kind, L.n_red, [&](auto op) {
      using Op = decltype(op);
      using Acc = typename Op::Acc;
      Acc* ws = static_cast<Acc*>(workspace);
      if (plan.columns) {
        constexpr int kVc = sizeof(T) >= 8 ? 2 : 4;
        const dim3 grid(static_cast<unsigned>(ceil_div(L.n_out, 32 * plan.vc)), static_cast<unsigned>(plan.chunks));
        if (plan.vc == kVc) {
          reduce_columns_kernel<kVc, T><<<grid, dim3(32, plan.by), 0, s>>>(xp, g, op, outs, ws);
        } else {
          reduce_columns_kernel<1, T><<<grid, dim3(32, plan.by), 0, s>>>(xp, g, op, outs, ws);
        }
      } else {
        const dim3 grid(static_cast<unsigned>(ceil_div(L.n_out, plan.by)), static_cast<unsigned>(plan.chunks));
        reduce_rows_kernel<V, T><<<grid, dim3(plan.bx, plan.by), 0, s>>>(xp, g, op, outs, ws);
      }
      if (plan.chunks > 1) {
        const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(L.n_out, 256), 8 * sm_count()));
        combine_kernel<<<blocks, 256, 0, s>>>(ws, L.n_out, plan.chunks, op, outs);
      }
    });
  });
  return done ? cudaGetLastError() : cudaErrorNotSupported;
}

bool softmax_rows_fits(int64_t rows, int64_t len) { return rows >= sm_count() || len <= 16384; }

cudaError_t launch_softmax_rows(DType dtype, bool log, const void* x, const Strided<1>& outer, int64_t rows,
                                int64_t len, void* y, void* stream) {
  if (rows == 0 || len == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  bool done = false;
  cudaError_t launched = cudaSuccess;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (is_float_v<T>) {
      constexpr int V = static_cast<int>(16 / sizeof(T));
      const int64_t row_bytes = len * static_cast<int64_t>(sizeof(T));
      int bx = 0, by = 1;
      int64_t blocks = 0;
      const int64_t nvec = len / V, cap = static_cast<int64_t>(kResThreads) * res_items<T>();  // packs per CTA
      bool aligned = aligned16(x) && aligned16(y) && len % V == 0;
      for (int d = 0; d < outer.ndim; ++d) aligned = aligned && (outer.strides[0][d] * static_cast<int64_t>(sizeof(T))) % 16 == 0;
      if (row_bytes >= (int64_t{64} << 10) && aligned && nvec <= cap * kResMaxCluster) {
        // Long rows that fit: held in registers by a cluster of k CTAs per row (read once).
        const int k = static_cast<int>(ceil_div(nvec, cap));
        const int64_t clusters = std::min<int64_t>(rows, (int64_t{1} << 20) / k);
        const Indexer<1> ix(outer, rows);
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(static_cast<unsigned>(clusters * k));
        cfg.blockDim = dim3(kResThreads);
        cfg.stream = s;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = static_cast<unsigned>(k);
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        const int per = static_cast<int>(ceil_div(nvec, k));
        const T* xp = static_cast<const T*>(x);
        T* yp = static_cast<T*>(y);
        launched = log ? cudaLaunchKernelEx(&cfg, softmax_resident_kernel<T, true>, xp, ix, rows, len, per, yp)
                       : cudaLaunchKernelEx(&cfg, softmax_resident_kernel<T, false>, xp, ix, rows, len, per, yp);
        done = true;
        return;
      }
      if (row_bytes >= (int64_t{64} << 10)) {
        // Long rows: a block of kSoftmaxThreads per row, at most one block per multiprocessor and no
        // more rows in flight than 3/4 of L2 holds, so the second pass reads the row from L2.
        bx = kSoftmaxThreads;
        int dev = 0, l2 = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess) {
          l2 = 50 << 20;
        }
        const int64_t in_l2 = std::max<int64_t>(1, (static_cast<int64_t>(l2) * 3 / 4) / row_bytes);
        blocks = std::min({rows, static_cast<int64_t>(sm_count()), std::max<int64_t>(in_l2, sm_count() / 2)});
      } else {
        bx = static_cast<int>(std::clamp<int64_t>(pow2_at_least(ceil_div(ceil_div(len, V), 2 * kUnroll)), 32, kSoftmaxThreads));
        by = std::max(1, 256 / bx);
        blocks = ceil_div(rows, by);
      }
      const Indexer<1> ix(outer, rows);
      const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
      if (log) {
        softmax_rows_kernel<V, T, true><<<grid, block, 0, s>>>(static_cast<const T*>(x), ix, rows, len, static_cast<T*>(y));
      } else {
        softmax_rows_kernel<V, T, false><<<grid, block, 0, s>>>(static_cast<const T*>(x), ix, rows, len, static_cast<T*>(y));
      }
      done = true;
    }
  });
  if (!done) return cudaErrorNotSupported;
  return launched != cudaSuccess ? launched : cudaGetLastError();
}

cudaError_t launch_softmax_apply(DType dtype, bool log, void* y, const void* x, const void* shift, const void* scale,
                                 const Strided<4>& st, int64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  bool done = false;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (is_float_v<T>) {
      using C = device_compute_t<T>;
      const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, 256), 8 * sm_count()));
      const Indexer<4> ix(st, n);
      auto args = [&](auto kernel) {
        kernel<<<blocks, 256, 0, s>>>(n, ix, static_cast<T*>(y), static_cast<const T*>(x), static_cast<const C*>(shift),
                                      static_cast<const C*>(scale));
      };
      if (log) {
        args(softmax_apply_kernel<T, true>);
      } else {
        args(softmax_apply_kernel<T, false>);
      }
      done = true;
    }
  });
  return done ? cudaGetLastError() : cudaErrorNotSupported;
}

}  // namespace kiln::cuda

// CPU kernels of the reductions (sum/mean/amax/amin, argmax, logsumexp, softmax/log_softmax) on
// inputs of any strides. Each output's reduction is split into fixed chunks folded left to right,
// so results do not depend on the thread count; floats accumulate sums in double.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "core/cpu/parallel.h"
#include "core/registry.h"
#include "core/dispatch.h"
#include "core/ops/reduce.h"

namespace kiln::cpu {
namespace {

constexpr int64_t kChunk = 16384;  // reduced elements per chunk: the unit of parallel work and of rounding
constexpr int64_t kGrain = 32768;  // elements read per parallel_for item, at least
constexpr int64_t kBlock = 256;    // adjacent outputs reduced together on the column path
constexpr size_t kMaxDims = 64;

template <class T> constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

template <class T> compute_t<T> load(T v) {
  if constexpr (is_half_v<T>) {
    return static_cast<float>(v);
  } else {
    return static_cast<compute_t<T>>(v);
  }
}

template <class T, class V> T store(V v) {
  if constexpr (is_half_v<T>) {
    return T(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <class V> bool is_nan(V v) {
  if constexpr (std::is_floating_point_v<V>) {
    return std::isnan(v);
  } else {
    return false;
  }
}

// exp(x - shift) for x - shift <= 0 or NaN (softmax arguments; a positive argument gives 1),
// kExpLanes floats at a time with GCC/Clang vector types: Cephes' expf polynomial (about 1 ulp),
// NaN kept, results below 2^-126 flushed to 0. The scalar form runs the same code on one lane, so
// every path rounds alike. Doubles use std::exp.
#if defined(__AVX__)
constexpr int64_t kExpLanes = 8;
#else
constexpr int64_t kExpLanes = 4;
#endif
using f32xN = float __attribute__((vector_size(4 * kExpLanes)));
using i32xN = int32_t __attribute__((vector_size(4 * kExpLanes)));

inline f32xN exp_vec(f32xN x) {
  const i32xN nan = x != x;
  const i32xN tiny = x < -87.3365f;
  const f32xN v = (f32xN)(~(nan | tiny | (x > 0.0f)) & (i32xN)x);  // out-of-domain lanes -> 0
  const f32xN n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln2)
  const f32xN r = (v - n * 0.693359375f) + n * 2.12194440e-4f;            // v - n ln2
  f32xN p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32xN two_n = (__builtin_convertvector(n, i32xN) + 127) << 23;  // 2^n, n in [-126, 0]
  const f32xN e = p * (f32xN)two_n;
  return (f32xN)((nan & (i32xN)x) | (~nan & ~tiny & (i32xN)e));
}

inline float exp_nonpos(float x) {
  f32xN v{};
  v[0] = x;
  return exp_vec(v)[0];
}
inline double exp_nonpos(double x) { return std::exp(x); }

// kExpLanes elements of a float-computed dtype as a vector.
template <class T> f32xN load_vec(const T* p) {
  f32xN v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int64_t i = 0; i < kExpLanes; ++i) v[i] = load(p[i]);
  }
  return v;
}

// Lane-wise max (min) of a and b where b also wins when it is NaN.
template <bool Max> f32xN pick_vec(f32xN a, f32xN b) {
  i32xN take;
  if constexpr (Max) {
    take = (b > a) | (b != b);
  } else {
    take = (b < a) | (b != b);
  }
  return (f32xN)((take & (i32xN)b) | (~take & (i32xN)a));
}

constexpr int64_t kTile = 256;  // elements per exp_run

// out[k] = exp(x[k] - shift[per_element ? k : 0]) for a contiguous run of n <= kTile elements of a
// float-computed dtype.
template <class T> void exp_run(const T* x, int64_t n, const float* shift, bool per_element, float* out) {
  std::array<float, kTile> tmp;
  const float* src = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    src = x;
  } else {
    for (int64_t k = 0; k < n; ++k) tmp[static_cast<size_t>(k)] = load(x[k]);
    src = tmp.data();
  }
  auto group = [&](int64_t k, size_t bytes) {  // kExpLanes elements from k; fewer (zero-padded) at the end
    f32xN v{}, sh{};
    std::memcpy(&v, src + k, bytes);
    if (per_element) {
      std::memcpy(&sh, shift + k, bytes);
    } else {
      sh += shift[0];
    }
    const f32xN e = exp_vec(v - sh);
    std::memcpy(out + k, &e, bytes);
  };
  int64_t k = 0;
  for (; k + kExpLanes <= n; k += kExpLanes) group(k, sizeof(f32xN));
  if (k < n) group(k, static_cast<size_t>(n - k) * sizeof(float));
}

// The walk of one reduction. "outer" dims are the kept dims, one position per output element in
// row-major order; "red" dims are the reduced ones, row-major. Size-1 dims are dropped and dims
// contiguous with each other merged. Strides are in elements; `out` strides address the output
// (only softmax writes per reduced element; reductions have 0 there).
struct Layout {
  Shape outer_size, outer_in, outer_out;
  Shape red_size, red_in, red_out;
  int64_t outer_n = 1;
  int64_t red_n = 1;

  // Offsets of output element `o`'s reduction start in the input and the output.
  std::pair<int64_t, int64_t> offsets(int64_t o) const {
    int64_t in = 0, out = 0;
    for (size_t d = outer_size.size(); d-- > 0;) {
      const int64_t i = o % outer_size[d];
      o /= outer_size[d];
      in += i * outer_in[d];
      out += i * outer_out[d];
    }
    return {in, out};
  }

  // Visits reduced elements [begin, end) (row-major positions) of the reduction at (in_base,
  // out_base) as runs along the innermost reduced dim:
  // run(in_offset, out_offset, count, in_stride, out_stride, first_position).
  template <class F> void visit(int64_t in_base, int64_t out_base, int64_t begin, int64_t end, F&& run) const {
    if (begin >= end) return;
    const size_t nd = red_size.size();
    const int64_t inner = red_size[nd - 1];
    const int64_t s_in = red_in[nd - 1], s_out = red_out[nd - 1];
    std::array<int64_t, kMaxDims> idx{};
    int64_t j = begin % inner, rest = begin / inner;
    int64_t row_in = in_base, row_out = out_base;  // offsets of the current innermost row's start
    for (size_t d = nd - 1; d-- > 0;) {
      idx[d] = rest % red_size[d];
      rest /= red_size[d];
      row_in += idx[d] * red_in[d];
      row_out += idx[d] * red_out[d];
    }
    for (int64_t pos = begin; pos < end;) {
      const int64_t count = std::min(inner - j, end - pos);
      run(row_in + j * s_in, row_out + j * s_out, count, s_in, s_out, pos);
      pos += count;
      j = 0;
      for (size_t d = nd - 1; d-- > 0;) {  // odometer step over the outer reduced dims
        row_in += red_in[d];
        row_out += red_out[d];
        if (++idx[d] < red_size[d]) break;
        row_in -= red_size[d] * red_in[d];
        row_out -= red_size[d] * red_out[d];
        idx[d] = 0;
      }
    }
  }
};

// `dims`: the reduced dims of x (sorted); `out_strides`: output strides per dim of x (0 on reduced
// dims for reductions). With `by_stride`, reduced dims are walked largest input stride first (any
// order gives the same reduction up to rounding; this one reads memory in order).
Layout make_layout(const Tensor& x, const std::vector<int64_t>& dims, const Shape& out_strides, bool by_stride,
                   const char* op) {
  KILN_CHECK(static_cast<size_t>(x.dim()) <= kMaxDims, op, "expected at most {} dims, found {}", kMaxDims, x.dim());
  struct Dim {
    int64_t size, in, out;
  };
  std::vector<Dim> outer, red;
  size_t k = 0;
  for (size_t d = 0; d < x.shape().size(); ++d) {
    const bool reduced = k < dims.size() && dims[k] == static_cast<int64_t>(d);
    if (reduced) ++k;
    (reduced ? red : outer).push_back({x.shape()[d], x.strides()[d], out_strides[d]});
  }
  if (by_stride) std::stable_sort(red.begin(), red.end(), [](const Dim& a, const Dim& b) { return a.in > b.in; });
  Layout L;
  auto squash = [](const std::vector<Dim>& ds, Shape& size, Shape& in, Shape& out, int64_t& n) {
    for (const Dim& d : ds) {
      n *= d.size;
      if (d.size == 1) continue;
      if (!size.empty() && in.back() == d.in * d.size && out.back() == d.out * d.size) {
        size.back() *= d.size;
        in.back() = d.in;
        out.back() = d.out;
      } else {
        size.push_back(d.size);
        in.push_back(d.in);
        out.push_back(d.out);
      }
    }
    if (size.empty()) {
      size = {1};
      in = {0};
      out = {0};
    }
  };
  squash(outer, L.outer_size, L.outer_in, L.outer_out, L.outer_n);
  squash(red, L.red_size, L.red_in, L.red_out, L.red_n);
  return L;
}

// Layout of a reduction over `dims`: its output is contiguous over the kept dims.
Layout reduction_layout(const Tensor& x, const std::vector<int64_t>& dims, bool by_stride, const char* op) {
  Shape keep = x.shape();
  for (int64_t d : dims) keep[static_cast<size_t>(d)] = 1;
  Shape st = contiguous_strides(keep);
  for (int64_t d : dims) st[static_cast<size_t>(d)] = 0;
  return make_layout(x, dims, st, by_stride, op);
}

// ---- drivers

// The column path: the innermost kept dim is contiguous in the input (and in the output, for
// softmax) while the reduced dims are strided, as in a sum over dim 0 of (N, D). Blocks of up to
// kBlock adjacent outputs then walk whole input rows together instead of one column each.
bool use_columns(const Layout& L) {
  return L.outer_in.back() == 1 && L.outer_out.back() == 1 && L.outer_size.back() >= 8 && L.red_in.back() != 1 &&
         L.red_n > 1;
}

// Reduced positions per chunk (fixed by the shape, so the rounding never depends on the threads).
int64_t chunk_positions(const Layout& L, bool columns) {
  return columns ? std::max<int64_t>(1, kChunk / std::min(L.outer_size.back(), kBlock)) : kChunk;
}

// Calls body(o0, w, split) for blocks of w adjacent outputs (w = 1 off the column path): over the
// threads by block when there are enough blocks or the reductions are short, else one block at a
// time with split = true, each reduction then being spread over the threads.
template <class F> void for_each_block(const Layout& L, bool columns, F&& body) {
  const int64_t K = columns ? L.outer_size.back() : 1;
  const int64_t W = std::min(K, kBlock);
  const int64_t per_row = (K + W - 1) / W;
  const int64_t nblocks = L.outer_n / K * per_row;
  const int64_t work = L.red_n * W;  // elements read per block
  auto one = [&](int64_t blk, bool split) {
    const int64_t first = blk % per_row * W;
    body(blk / per_row * K + first, std::min(W, K - first), split);
  };
  if (nblocks >= num_threads() || work <= kChunk) {
    parallel_for(nblocks, std::max<int64_t>(1, kGrain / std::max<int64_t>(work, 1)), [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) one(blk, false);
    });
  } else {
    for (int64_t blk = 0; blk < nblocks; ++blk) one(blk, true);
  }
}

// Folds `op` over the reductions of w adjacent outputs starting at input offset `base` into
// acc[0..w): chunks of `chunk` positions, each reduced by op.run (runs of one output) or op.row
// (one element of each of the w outputs), merged left to right, in parallel when `split`.
// An Op has: Acc, init(), merge(Acc&, const Acc&), run(p, n, stride, first_pos) -> Acc, and
// row(Acc* a, const T* row, w, pos) folding row[j] into a[j].
template <class Op, class T>
void fold(const Layout& L, const T* x, int64_t base, int64_t w, bool columns, int64_t chunk, bool split, const Op& op,
          typename Op::Acc* acc) {
  using Acc = typename Op::Acc;
  auto partial = [&](int64_t c, Acc* a) {
    for (int64_t j = 0; j < w; ++j) a[j] = op.init();
    const int64_t b = c * chunk, e = std::min(L.red_n, (c + 1) * chunk);
    L.visit(base, 0, b, e, [&](int64_t off, int64_t, int64_t n, int64_t s, int64_t, int64_t pos) {
      if (!columns) {
        op.merge(a[0], op.run(x + off, n, s, pos));
        return;
      }
      for (int64_t k = 0; k < n; ++k) op.row(a, x + off + k * s, w, pos + k);
    });
  };
  const int64_t nchunks = std::max<int64_t>(1, (L.red_n + chunk - 1) / chunk);
  if (!split || nchunks == 1) {
    partial(0, acc);
    std::array<Acc, kBlock> part;
    for (int64_t c = 1; c < nchunks; ++c) {
      partial(c, part.data());
      for (int64_t j = 0; j < w; ++j) op.merge(acc[j], part[static_cast<size_t>(j)]);
    }
    return;
  }
  std::vector<Acc> parts(static_cast<size_t>(nchunks * w));  // (nchunks, w)
  parallel_for(nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) partial(c, parts.data() + c * w);
  });
  for (int64_t j = 0; j < w; ++j) acc[j] = parts[static_cast<size_t>(j)];
  for (int64_t c = 1; c < nchunks; ++c) {
    for (int64_t j = 0; j < w; ++j) op.merge(acc[j], parts[static_cast<size_t>(c * w + j)]);
  }
}

// ---- accumulators

// Sums: floats in double, ints in wrapping u64; contiguous runs use 8 lanes.
template <class T, class A> struct SumOp {
  using Acc = A;
  Acc init() const { return Acc(0); }
  void merge(Acc& a, const Acc& b) const { a += b; }
  void row(Acc* a, const T* r, int64_t w, int64_t) const {
    for (int64_t j = 0; j < w; ++j) a[j] += static_cast<Acc>(load(r[j]));
  }
  Acc run(const T* p, int64_t n, int64_t s, int64_t) const {
    std::array<Acc, 8> lane{};
    int64_t k = 0;
    if (s == 1) {
      for (; k + 8 <= n; k += 8) {
        for (size_t j = 0; j < 8; ++j) lane[j] += static_cast<Acc>(load(p[k + static_cast<int64_t>(j)]));
      }
    }
    for (; k < n; ++k) lane[0] += static_cast<Acc>(load(p[k * s]));
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
};

// Maximum or minimum in the compute type; NaN wins. Floats run kExpLanes at a time.
template <class T, bool Max> struct ExtremeOp {
  using Acc = compute_t<T>;
  Acc init() const {
    if constexpr (std::numeric_limits<Acc>::has_infinity) {
      return Max ? -std::numeric_limits<Acc>::infinity() : std::numeric_limits<Acc>::infinity();
    } else {
      return Max ? std::numeric_limits<Acc>::lowest() : std::numeric_limits<Acc>::max();
    }
  }
  static Acc pick(Acc a, Acc b) {
    const bool take = (Max ? b > a : b < a) | is_nan(b);
    return take ? b : a;
  }
  void merge(Acc& a, const Acc& b) const { a = pick(a, b); }
  void row(Acc* a, const T* r, int64_t w, int64_t) const {
    int64_t j = 0;
    if constexpr (std::is_same_v<Acc, float>) {
      for (; j + kExpLanes <= w; j += kExpLanes) {
        f32xN v;
        std::memcpy(&v, a + j, sizeof v);
        v = pick_vec<Max>(v, load_vec(r + j));
        std::memcpy(a + j, &v, sizeof v);
      }
    }
    for (; j < w; ++j) a[j] = pick(a[j], load(r[j]));
  }
  Acc run(const T* p, int64_t n, int64_t s, int64_t) const {
    Acc a = init();
    int64_t k = 0;
    if constexpr (std::is_same_v<Acc, float>) {
      if (s == 1 && n >= kExpLanes) {
        f32xN v = f32xN{} + a;
        for (; k + kExpLanes <= n; k += kExpLanes) v = pick_vec<Max>(v, load_vec(p + k));
        for (int64_t j = 0; j < kExpLanes; ++j) a = pick(a, v[j]);
      }
    }
    for (; k < n; ++k) a = pick(a, load(p[k * s]));
    return a;
  }
};

// (value, position) of the first maximum; NaN counts as the maximum; position -1 before any element.
template <class T> struct ArgMaxOp {
  using C = compute_t<T>;
  using Acc = std::pair<C, int64_t>;
  static bool better(C v, C best) { return v > best || (is_nan(v) && !is_nan(best)); }
  Acc init() const { return {C{}, -1}; }
  void merge(Acc& a, const Acc& b) const {  // `b` comes later: ties keep `a`
    if (b.second >= 0 && (a.second < 0 || better(b.first, a.first))) a = b;
  }
  static void step(Acc& a, C v, int64_t pos) {
    if (a.second < 0 || better(v, a.first)) a = {v, pos};
  }
  void row(Acc* a, const T* r, int64_t w, int64_t pos) const {
    for (int64_t j = 0; j < w; ++j) step(a[j], load(r[j]), pos);
  }
  Acc run(const T* p, int64_t n, int64_t s, int64_t pos) const {
    if constexpr (std::is_same_v<C, float>) {
      if (s == 1 && n >= kExpLanes) {  // the maximum (vectorised), then where it first occurs
        const C m = ExtremeOp<T, true>{}.run(p, n, 1, 0);
        for (int64_t k = 0; k < n; ++k) {
          const C v = load(p[k]);
          if (v == m || (is_nan(m) && is_nan(v))) return {m, pos + k};
        }
      }
    }
    Acc a = init();
    for (int64_t k = 0; k < n; ++k) step(a, load(p[k * s]), pos + k);
    return a;
  }
};

// sum(exp(x - shift[j])) in double, exp in the compute type (vectorised for floats).
template <class T> struct SumExpOp {
  using C = compute_t<T>;
  using Acc = double;
  const C* shift;  // (w)
  Acc init() const { return 0.0; }
  void merge(Acc& a, const Acc& b) const { a += b; }
  void row(Acc* a, const T* r, int64_t w, int64_t) const {
    if constexpr (std::is_same_v<C, float>) {
      std::array<float, kTile> e;
      exp_run(r, w, shift, true, e.data());
      for (int64_t j = 0; j < w; ++j) a[j] += static_cast<double>(e[static_cast<size_t>(j)]);
    } else {
      for (int64_t j = 0; j < w; ++j) a[j] += exp_nonpos(load(r[j]) - shift[j]);
    }
  }
  Acc run(const T* p, int64_t n, int64_t s, int64_t) const {
    std::array<double, 8> lane{};
    int64_t k = 0;
    if constexpr (std::is_same_v<C, float>) {
      if (s == 1) {
        std::array<float, kTile> e;
        for (; k + kTile <= n; k += kTile) {
          exp_run(p + k, kTile, shift, false, e.data());
          for (size_t i = 0; i < static_cast<size_t>(kTile); i += 8) {
            for (size_t j = 0; j < 8; ++j) lane[j] += static_cast<double>(e[i + j]);
          }
        }
      }
    }
    for (; k < n; ++k) lane[0] += static_cast<double>(exp_nonpos(load(p[k * s]) - shift[0]));
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
};

// ---- kernels

// Reduces every output of `L` with `op`, writing finish(acc) to out[o].
template <class T, class Op, class Out, class Fin>
void reduce_all(const Layout& L, const T* x, Out* out, const Op& op, Fin&& finish) {
  const bool columns = use_columns(L);
  const int64_t chunk = chunk_positions(L, columns);
  for_each_block(L, columns, [&](int64_t o0, int64_t w, bool split) {
    std::array<typename Op::Acc, kBlock> acc;
    fold(L, x, L.offsets(o0).first, w, columns, chunk, split, op, acc.data());
    for (int64_t j = 0; j < w; ++j) out[o0 + j] = finish(acc[static_cast<size_t>(j)]);
  });
}

void reduce_kernel(const prim::Reduce& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  const Layout L = reduction_layout(x, op.dims(), true, op.name());
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* xp = x.numel() > 0 ? x.data_ptr<T>() : nullptr;
    const double n = static_cast<double>(L.red_n);
    switch (op.kind()) {
      case prim::ReduceKind::sum:
        if constexpr (std::is_integral_v<C>) {
          reduce_all(L, xp, y.data_ptr<int64_t>(), SumOp<T, uint64_t>{}, [](uint64_t a) { return static_cast<int64_t>(a); });
        } else {
          reduce_all(L, xp, y.data_ptr<T>(), SumOp<T, double>{}, [](double a) { return store<T>(a); });
        }
        break;
      case prim::ReduceKind::mean:
        if constexpr (!std::is_integral_v<C>) {  // infer() admits floats only
          reduce_all(L, xp, y.data_ptr<T>(), SumOp<T, double>{}, [n](double a) { return store<T>(a / n); });
        }
        break;
      case prim::ReduceKind::max:
        reduce_all(L, xp, y.data_ptr<T>(), ExtremeOp<T, true>{}, [](C a) { return store<T>(a); });
        break;
      case prim::ReduceKind::min:
        reduce_all(L, xp, y.data_ptr<T>(), ExtremeOp<T, false>{}, [](C a) { return store<T>(a); });
        break;
    }
  });
}

void argmax_kernel(const prim::ArgMax& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  std::vector<int64_t> dims;
  if (x.dim() > 0) dims.push_back(op.dim());
  const Layout L = reduction_layout(x, dims, false, "argmax");
  int64_t* yp = y.data_ptr<int64_t>();
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    reduce_all(L, x.data_ptr<T>(), yp, ArgMaxOp<T>{}, [](const typename ArgMaxOp<T>::Acc& a) { return a.second; });
  });
}

// Per-output statistics of a block for logsumexp/softmax: m = maximum, shift = what is subtracted
// before exp (m, or 0 where m is not finite so that no inf - inf arises), s = sum(exp(x - shift)).
template <class T> struct RowStats {
  using C = compute_t<T>;
  std::array<C, kBlock> m, shift;
  std::array<double, kBlock> s;

  void compute(const Layout& L, const T* x, int64_t base, int64_t w, bool columns, int64_t chunk, bool split) {
    fold(L, x, base, w, columns, chunk, split, ExtremeOp<T, true>{}, m.data());
    bool any_finite = false;
    for (size_t j = 0; j < static_cast<size_t>(w); ++j) {
      shift[j] = std::isfinite(m[j]) ? m[j] : C(0);
      any_finite = any_finite || std::isfinite(m[j]);
    }
    if (any_finite) fold(L, x, base, w, columns, chunk, split, SumExpOp<T>{shift.data()}, s.data());
  }
};

void logsumexp_kernel(const prim::LogSumExp& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  const Layout L = reduction_layout(x, op.dims(), true, "logsumexp");
  const bool columns = use_columns(L);
  const int64_t chunk = chunk_positions(L, columns);
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_integral_v<compute_t<T>>) {  // infer() admits floats only
      const T* xp = x.numel() > 0 ? x.data_ptr<T>() : nullptr;
      T* yp = y.data_ptr<T>();
      for_each_block(L, columns, [&](int64_t o0, int64_t w, bool split) {
        RowStats<T> st;
        st.compute(L, xp, L.offsets(o0).first, w, columns, chunk, split);
        for (size_t j = 0; j < static_cast<size_t>(w); ++j) {
          // a maximum that is not finite is the answer: -inf (all -inf or empty), +inf, NaN
          yp[o0 + static_cast<int64_t>(j)] =
              std::isfinite(st.m[j]) ? store<T>(static_cast<double>(st.m[j]) + std::log(st.s[j])) : store<T>(st.m[j]);
        }
      });
    }
  });
}

// Writes n softmax values dst[k * ds] from src[k * ss]: exp(x - shift) * scale, or (x - shift) - scale
// for log_softmax, with shift/scale at sh[k * cs], sc[k * cs] (cs 0: one row; 1: one per column).
template <class T>
void write_line(const T* src, int64_t ss, T* dst, int64_t ds, int64_t n, const compute_t<T>* sh,
                const compute_t<T>* sc, int64_t cs, bool log) {
  if (log) {
    for (int64_t k = 0; k < n; ++k) dst[k * ds] = store<T>((load(src[k * ss]) - sh[k * cs]) - sc[k * cs]);
    return;
  }
  if constexpr (std::is_same_v<compute_t<T>, float>) {
    if (ss == 1) {
      std::array<float, kTile> e;
      for (int64_t k = 0; k < n; k += kTile) {
        const int64_t len = std::min(kTile, n - k);
        exp_run(src + k, len, sh + k * cs, cs == 1, e.data());
        for (int64_t i = 0; i < len; ++i) dst[(k + i) * ds] = store<T>(e[static_cast<size_t>(i)] * sc[(k + i) * cs]);
      }
      return;
    }
  }
  for (int64_t k = 0; k < n; ++k) dst[k * ds] = store<T>(exp_nonpos(load(src[k * ss]) - sh[k * cs]) * sc[k * cs]);
}

void softmax_kernel(const prim::Softmax& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  Tensor& y = out[0];  // (x.shape) contiguous
  if (y.numel() == 0) return;
  std::vector<int64_t> dims;
  if (x.dim() > 0) dims.push_back(op.dim());
  const Layout L = make_layout(x, dims, y.strides(), false, op.name());
  const bool columns = use_columns(L);
  const int64_t chunk = chunk_positions(L, columns);
  const bool log = op.log();
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    if constexpr (!std::is_integral_v<C>) {  // infer() admits floats only
      const T* xp = x.data_ptr<T>();
      T* yp = y.data_ptr<T>();
      for_each_block(L, columns, [&](int64_t o0, int64_t w, bool split) {
        const std::pair<int64_t, int64_t> off = L.offsets(o0);
        const int64_t ib = off.first, ob = off.second;  // input and output offsets of the block
        RowStats<T> st;
        st.compute(L, xp, ib, w, columns, chunk, split);
        // y = exp(x - shift) * scale, or (x - shift) - scale for log_softmax. A row of all -inf has
        // shift 0 and gives exp(-inf) * 0 = 0, or -inf - 0 = -inf; +inf or NaN rows give NaN.
        std::array<C, kBlock> scale;
        for (size_t j = 0; j < static_cast<size_t>(w); ++j) {
          const bool dead = st.m[j] == -std::numeric_limits<C>::infinity();
          const double s = std::isfinite(st.m[j]) ? st.s[j] : std::numeric_limits<double>::quiet_NaN();
          scale[j] = dead ? C(0) : static_cast<C>(log ? std::log(s) : 1.0 / s);
        }
        auto write = [&](int64_t c) {
          L.visit(ib, ob, c * chunk, std::min(L.red_n, (c + 1) * chunk),
                  [&](int64_t io, int64_t oo, int64_t n, int64_t si, int64_t so, int64_t) {
                    if (!columns) {
                      write_line(xp + io, si, yp + oo, so, n, st.shift.data(), scale.data(), 0, log);
                      return;
                    }
                    for (int64_t k = 0; k < n; ++k) {  // rows of w adjacent outputs
                      write_line(xp + io + k * si, 1, yp + oo + k * so, 1, w, st.shift.data(), scale.data(), 1, log);
                    }
                  });
        };
        const int64_t nchunks = (L.red_n + chunk - 1) / chunk;
        if (split) {
          parallel_for(nchunks, 1, [&](int64_t b, int64_t e) {
            for (int64_t c = b; c < e; ++c) write(c);
          });
        } else {
          for (int64_t c = 0; c < nchunks; ++c) write(c);
        }
      });
    }
  });
}

}  // namespace

KILN_REGISTER(cpu_reduce_kernels) {
  register_kernel<prim::Reduce>(DeviceType::cpu, &reduce_kernel);
  register_kernel<prim::ArgMax>(DeviceType::cpu, &argmax_kernel);
  register_kernel<prim::LogSumExp>(DeviceType::cpu, &logsumexp_kernel);
  register_kernel<prim::Softmax>(DeviceType::cpu, &softmax_kernel);
}

}  // namespace kiln::cpu

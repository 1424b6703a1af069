// Blocked, packed GEMM in the BLIS layout: C is split into one block per thread; each packs (KC, NC)
// blocks of B into NR-wide panels and (MC, KC) blocks of A into MR-tall panels, and a MR x NR
// register tile (GCC vector extensions, FMA under -march=x86-64-v3) sweeps them. GEMV for M or N == 1.
#include "core/cpu/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "core/cpu/parallel.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace kiln::cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));

// Register tile (mr x nr) and cache blocks (kc: depth of a packed panel, mc: rows of the packed A
// block kept in L2, nc: columns of the packed B block) per compute type.
template <class C> struct Traits;
template <> struct Traits<float> {
  using V = v8f;
  static constexpr int64_t lanes = 8, mr = 6, nr = 16, kc = 256, mc = 144, nc = 2048;
};
template <> struct Traits<double> {
  using V = v4d;
  static constexpr int64_t lanes = 4, mr = 6, nr = 8, kc = 256, mc = 96, nc = 1024;
};

// Below this many multiply-adds a GEMM runs on the calling thread only.
constexpr int64_t kParallelWork = int64_t{1} << 21;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline double widen(double x) { return x; }
inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(f16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  return static_cast<float>(x);
#endif
}

// A 64-byte aligned scratch buffer that only grows; one per thread and compute type.
template <class C>
class PackBuffer {
 public:
  C* get(int64_t count) {
    if (count > capacity_) {
      size_t bytes = static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(C)), 64));
      void* p = std::aligned_alloc(64, bytes);
      if (p == nullptr) throw std::bad_alloc();
      data_.reset(static_cast<C*>(p));
      capacity_ = count;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(C* p) const { std::free(p); }
  };
  std::unique_ptr<C, Free> data_;
  int64_t capacity_ = 0;
};

template <class C> PackBuffer<C>& a_buffer() {
  thread_local PackBuffer<C> buf;
  return buf;
}
template <class C> PackBuffer<C>& b_buffer() {
  thread_local PackBuffer<C> buf;
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Packing. A block (mc, kc) -> panels of MR rows, each (kc, MR) contiguous, rows past mc zero.
// B block (kc, nc) -> panels of NR columns, each (kc, NR) contiguous, columns past nc zero.

template <class T, class C>
void pack_a(int64_t mc, int64_t kc, const T* a, int64_t rs, int64_t cs, C* out) {
  constexpr int64_t MR = Traits<C>::mr;
  for (int64_t i0 = 0; i0 < mc; i0 += MR, out += kc * MR) {
    const int64_t rows = std::min(MR, mc - i0);
    const T* src = a + i0 * rs;
    if (rows == MR && cs == 1) {
      for (int64_t i = 0; i < MR; ++i) {
        const T* row = src + i * rs;
        for (int64_t p = 0; p < kc; ++p) out[p * MR + i] = widen(row[p]);
      }
    } else if (rows == MR && rs == 1) {
      for (int64_t p = 0; p < kc; ++p) {
        const T* col = src + p * cs;
        for (int64_t i = 0; i < MR; ++i) out[p * MR + i] = widen(col[i]);
      }
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        for (int64_t i = 0; i < rows; ++i) out[p * MR + i] = widen(src[i * rs + p * cs]);
        for (int64_t i = rows; i < MR; ++i) out[p * MR + i] = C(0);
      }
    }
  }
}

// Packs panels [panel_begin, panel_end) of the (kc, nc) block of B starting at `b`.
template <class T, class C>
void pack_b(int64_t kc, int64_t nc, int64_t panel_begin, int64_t panel_end, const T* b, int64_t rs, int64_t cs,
            C* packed) {
  constexpr int64_t NR = Traits<C>::nr;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const int64_t j0 = panel * NR;
    const int64_t cols = std::min(NR, nc - j0);
    const T* src = b + j0 * cs;
    C* out = packed + panel * kc * NR;
    if (cols == NR && cs == 1) {
      for (int64_t p = 0; p < kc; ++p) {
        const T* row = src + p * rs;
        for (int64_t j = 0; j < NR; ++j) out[p * NR + j] = widen(row[j]);
      }
    } else if (cols == NR && rs == 1) {
      for (int64_t j = 0; j < NR; ++j) {
        const T* col = src + j * cs;
        for (int64_t p = 0; p < kc; ++p) out[p * NR + j] = widen(col[p]);
      }
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        for (int64_t j = 0; j < cols; ++j) out[p * NR + j] = widen(src[p * rs + j * cs]);
        for (int64_t j = cols; j < NR; ++j) out[p * NR + j] = C(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: c (MR, NR) with leading dimension ldc (+)= ap (kc, MR)^T-panel @ bp (kc, NR).
// MR * NR / lanes accumulators stay in registers (12 of the 16 ymm registers).

template <class C>
inline void micro_kernel(int64_t kc, const C* __restrict ap, const C* __restrict bp, C* __restrict c, int64_t ldc,
                         bool accumulate) {
  using Tr = Traits<C>;
  using V = typename Tr::V;
  constexpr int64_t MR = Tr::mr, NV = Tr::nr / Tr::lanes;
  V acc[MR][NV];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t p = 0; p < kc; ++p) {
    V bv[NV];
    for (int64_t j = 0; j < NV; ++j) std::memcpy(&bv[j], bp + j * Tr::lanes, sizeof(V));
    for (int64_t i = 0; i < MR; ++i) {
      const C av = ap[i];
      for (int64_t j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
    ap += MR;
    bp += Tr::nr;
  }
  for (int64_t i = 0; i < MR; ++i) {
    for (int64_t j = 0; j < NV; ++j) {
      C* dst = c + i * ldc + j * Tr::lanes;
      V out = acc[i][j];
      if (accumulate) {
        V old;
        std::memcpy(&old, dst, sizeof(V));
        out += old;
      }
      std::memcpy(dst, &out, sizeof(V));
    }
  }
}

// A partial tile at the bottom/right edge: full tile into a scratch tile, then the valid part.
template <class C>
void edge_tile(int64_t kc, const C* ap, const C* bp, C* c, int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  constexpr int64_t MR = Traits<C>::mr, NR = Traits<C>::nr;
  alignas(64) C tile[MR * NR];  // (MR, NR)
  micro_kernel<C>(kc, ap, bp, tile, NR, false);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      C& dst = c[i * ldc + j];
      dst = accumulate ? dst + tile[i * NR + j] : tile[i * NR + j];
    }
  }
}

// c (mc, nc block, ldc) (+)= packed A block (mc, kc) @ packed B panels [panel_begin, panel_end).
template <class C>
void macro_kernel(int64_t mc, int64_t nc, int64_t kc, int64_t panel_begin, int64_t panel_end, const C* apack,
                  const C* bpack, C* c, int64_t ldc, bool accumulate) {
  constexpr int64_t MR = Traits<C>::mr, NR = Traits<C>::nr;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const int64_t j = panel * NR;
    const int64_t cols = std::min(NR, nc - j);
    const C* bp = bpack + panel * kc * NR;
    for (int64_t i = 0; i < mc; i += MR) {
      const int64_t rows = std::min(MR, mc - i);
      const C* ap = apack + i * kc;
      C* cp = c + i * ldc + j;
      if (rows == MR && cols == NR) {
        micro_kernel<C>(kc, ap, bp, cp, ldc, accumulate);
      } else {
        edge_tile<C>(kc, ap, bp, cp, ldc, rows, cols, accumulate);
      }
    }
  }
}

// One thread's share: the BLIS loops over a (m, n) block of C, packing into this thread's buffers.
template <class T>
void gemm_block(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, compute_t<T>* c, int64_t ldc,
                bool accumulate) {
  using C = compute_t<T>;
  using Tr = Traits<C>;
  constexpr int64_t MR = Tr::mr, NR = Tr::nr;
  // M in blocks of equal size (a multiple of MR) no larger than about MC.
  const int64_t m_blocks = ceil_div(m, Tr::mc);
  const int64_t mc = round_up(ceil_div(m, m_blocks), MR);
  const int64_t kc_max = std::min(k, Tr::kc);
  C* bpack = b_buffer<C>().get(round_up(std::min(n, Tr::nc), NR) * kc_max);  // (nc/NR, kc, NR)
  C* apack = a_buffer<C>().get(mc * kc_max);                                  // (mc/MR, kc, MR)
  for (int64_t jc = 0; jc < n; jc += Tr::nc) {
    const int64_t nc = std::min(Tr::nc, n - jc);
    const int64_t n_panels = ceil_div(nc, NR);
    for (int64_t pc = 0; pc < k; pc += Tr::kc) {
      const int64_t kc = std::min(Tr::kc, k - pc);
      pack_b(kc, nc, 0, n_panels, b.data + pc * b.row_stride + jc * b.col_stride, b.row_stride, b.col_stride, bpack);
      const bool acc = accumulate || pc > 0;
      for (int64_t ic = 0; ic < m; ic += mc) {
        const int64_t rows = std::min(mc, m - ic);
        pack_a(rows, kc, a.data + ic * a.row_stride + pc * a.col_stride, a.row_stride, a.col_stride, apack);
        macro_kernel<C>(rows, nc, kc, 0, n_panels, apack, bpack, c + ic * ldc + jc, ldc, acc);
      }
    }
  }
}

// Splits C into a grid of mp x np blocks, one per thread, each running gemm_block: one parallel
// region per call; the grid is the one that packs the fewest redundant panels (A is packed np
// times, B mp times).
template <class T>
void packed_gemm(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, compute_t<T>* c, int64_t ldc,
                 bool accumulate) {
  using C = compute_t<T>;
  constexpr int64_t MR = Traits<C>::mr, NR = Traits<C>::nr;
  const double md = static_cast<double>(m), nd = static_cast<double>(n);
  const int64_t threads = md * nd * static_cast<double>(k) >= static_cast<double>(kParallelWork) ? num_threads() : 1;
  const int64_t m_units = ceil_div(m, MR), n_units = ceil_div(n, NR);
  int64_t mp = 1, np = 1;
  double best_cost = 0;
  for (int64_t cand_m = 1; cand_m <= std::min(threads, m_units); ++cand_m) {
    const int64_t cand_n = std::min(n_units, threads / cand_m);
    const double cost = static_cast<double>(cand_n) * md + static_cast<double>(cand_m) * nd;
    if (cand_m * cand_n > mp * np || (cand_m * cand_n == mp * np && cost < best_cost)) {
      mp = cand_m;
      np = cand_n;
      best_cost = cost;
    }
  }
  if (mp * np == 1) {
    gemm_block<T>(m, n, k, a, b, c, ldc, accumulate);
    return;
  }
  parallel_for(mp * np, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t im = t / np, in = t % np;
      const int64_t r0 = std::min(m, im * m_units / mp * MR), r1 = std::min(m, (im + 1) * m_units / mp * MR);
      const int64_t c0 = std::min(n, in * n_units / np * NR), c1 = std::min(n, (in + 1) * n_units / np * NR);
      if (r0 >= r1 || c0 >= c1) continue;
      MatrixRef<T> a_part{a.data + r0 * a.row_stride, a.row_stride, a.col_stride};
      MatrixRef<T> b_part{b.data + c0 * b.col_stride, b.row_stride, b.col_stride};
      gemm_block<T>(r1 - r0, c1 - c0, k, a_part, b_part, c + r0 * ldc + c0, ldc, accumulate);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// GEMV: y[j * incy] (+)= sum_p x[p] * mat(p, j) for j < n, mat(p, j) = mat[p * rs + j * cs], with
// x (k) contiguous in the compute type. Needs cs == 1 (row sweeps) or rs == 1 (dot products).

template <class T, class V>
inline void load_widen(const T* p, V& out) {
  using C = compute_t<T>;
  constexpr int64_t L = static_cast<int64_t>(sizeof(V) / sizeof(C));
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(&out, p, sizeof(V));
  } else {
    for (int64_t i = 0; i < L; ++i) out[i] = widen(p[i]);
  }
}

// out[c] = sum_p x[p] * cols[c][p] for C columns at once (independent streams hide memory latency).
template <class T, int64_t NC>
void dots(const compute_t<T>* x, const T* const* cols, int64_t k, compute_t<T>* out) {
  using C = compute_t<T>;
  using V = typename Traits<C>::V;
  constexpr int64_t L = Traits<C>::lanes;
  V s0[NC], s1[NC];
  for (int64_t c = 0; c < NC; ++c) s0[c] = s1[c] = V{};
  int64_t p = 0;
  for (; p + 2 * L <= k; p += 2 * L) {
    V x0, x1;
    std::memcpy(&x0, x + p, sizeof(V));
    std::memcpy(&x1, x + p + L, sizeof(V));
    for (int64_t c = 0; c < NC; ++c) {
      V v0, v1;
      load_widen(cols[c] + p, v0);
      load_widen(cols[c] + p + L, v1);
      s0[c] += x0 * v0;
      s1[c] += x1 * v1;
    }
  }
  for (int64_t c = 0; c < NC; ++c) {
    V v = s0[c] + s1[c];
    C s = 0;
    for (int64_t i = 0; i < L; ++i) s += v[i];
    for (int64_t q = p; q < k; ++q) s += x[q] * widen(cols[c][q]);
    out[c] = s;
  }
}

template <class T>
void gemv(int64_t n, int64_t k, const T* x, int64_t incx, const T* mat, int64_t rs, int64_t cs, compute_t<T>* y,
          int64_t incy, bool accumulate) {
  using C = compute_t<T>;
  std::vector<C> xbuf(static_cast<size_t>(k));  // (k) x widened and contiguous
  for (int64_t p = 0; p < k; ++p) xbuf[static_cast<size_t>(p)] = widen(x[p * incx]);
  const C* xs = xbuf.data();
  auto store = [&](int64_t j, C v) {
    C& dst = y[j * incy];
    dst = accumulate ? dst + v : v;
  };
  if (cs == 1) {
    constexpr int64_t JB = 256;  // columns per block: the accumulators stay in L1
    const int64_t blocks = ceil_div(n, JB);
    const int64_t grain = std::max<int64_t>(1, kParallelWork / (k * JB));
    parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
      alignas(64) C acc[JB];  // (JB)
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * JB;
        const int64_t jn = std::min(JB, n - j0);
        for (int64_t j = 0; j < jn; ++j) acc[j] = C(0);
        for (int64_t p = 0; p < k; ++p) {
          const C xv = xs[p];
          const T* row = mat + p * rs + j0;
          for (int64_t j = 0; j < jn; ++j) acc[j] += xv * widen(row[j]);
        }
        for (int64_t j = 0; j < jn; ++j) store(j0 + j, acc[j]);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kParallelWork / k);
    parallel_for(n, grain, [&](int64_t j0, int64_t j1) {
      int64_t j = j0;
      C out[4];
      for (; j + 4 <= j1; j += 4) {
        const T* cols[4] = {mat + j * cs, mat + (j + 1) * cs, mat + (j + 2) * cs, mat + (j + 3) * cs};
        dots<T, 4>(xs, cols, k, out);
        for (int64_t c = 0; c < 4; ++c) store(j + c, out[c]);
      }
      for (; j < j1; ++j) {
        const T* col = mat + j * cs;
        dots<T, 1>(xs, &col, k, out);
        store(j, out[0]);
      }
    });
  }
}

}  // namespace

template <class T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, compute_t<T>* c, int64_t ldc,
          bool accumulate) {
  using C = compute_t<T>;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, C(0));
    }
    return;
  }
  if (m == 1 && (b.col_stride == 1 || b.row_stride == 1)) {
    // c (1, n): x = row 0 of A, mat = B
    gemv<T>(n, k, a.data, a.col_stride, b.data, b.row_stride, b.col_stride, c, 1, accumulate);
    return;
  }
  if (n == 1 && (a.row_stride == 1 || a.col_stride == 1)) {
    // c (m, 1): x = column 0 of B, mat(p, i) = A(i, p)
    gemv<T>(m, k, b.data, b.row_stride, a.data, a.col_stride, a.row_stride, c, ldc, accumulate);
    return;
  }
  packed_gemm<T>(m, n, k, a, b, c, ldc, accumulate);
}

template void gemm<double>(int64_t, int64_t, int64_t, MatrixRef<double>, MatrixRef<double>, double*, int64_t,
                           bool);
template void gemm<float>(int64_t, int64_t, int64_t, MatrixRef<float>, MatrixRef<float>, float*, int64_t, bool);
template void gemm<bf16>(int64_t, int64_t, int64_t, MatrixRef<bf16>, MatrixRef<bf16>, float*, int64_t, bool);
template void gemm<f16>(int64_t, int64_t, int64_t, MatrixRef<f16>, MatrixRef<f16>, float*, int64_t, bool);

}  // namespace kiln::cpu

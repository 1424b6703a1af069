// CPU kernels of embedding, RMSNorm, rotary embedding, cross-entropy and SwiGLU (forward and backward).
// Inputs may be any strided view; outputs are contiguous. bf16/f16/f32 compute in f32, f64 in f64.
// Attention kernels live in nn_attention.cpp.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/cpu/nn_common.h"
#include "core/registry.h"
#include "core/dispatch.h"
#include "core/ops/nn.h"

namespace kiln::cpu {
namespace {

using nn::gather;
using nn::gather_index;
using nn::load;
using nn::row_offsets;
using nn::store;
using nn::visit_float;

// Work items per parallel chunk so a chunk holds roughly `target` elements of work.
int64_t grain_for(int64_t work_per_item, int64_t target = 16384) {
  return std::max<int64_t>(1, target / std::max<int64_t>(work_per_item, 1));
}

// ---- embedding

void check_ids(const std::vector<int64_t>& ids, int64_t v, const char* op) {
  for (size_t i = 0; i < ids.size(); ++i) {
    KILN_CHECK(ids[i] >= 0 && ids[i] < v, op, "id {} (at flat position {}) is out of range for V = {} embeddings",
               ids[i], i, v);
  }
}

void embedding_kernel(const prim::Embedding&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& w = in[0];  // (V, D)
  const int64_t v = w.size(0), d = w.size(1);
  const std::vector<int64_t> ids = gather_index(in[1], "embedding");  // (N)
  check_ids(ids, v, "embedding");
  visit_float(w.dtype(), "embedding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* wp = static_cast<const T*>(w.raw_data());
    const int64_t s0 = w.strides()[0], s1 = w.strides()[1];
    T* op = out[0].data_ptr<T>();  // (N, D)
    parallel_for(static_cast<int64_t>(ids.size()), grain_for(d), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* src = wp + ids[static_cast<size_t>(n)] * s0;
        T* dst = op + n * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = src[j * s1];
      }
    });
  });
}

void embedding_backward_kernel(const prim::EmbeddingBackward& p, const std::vector<Tensor>& in,
                               std::vector<Tensor>& out) {
  const Tensor& g = in[0];  // (..., D)
  const int64_t v = p.num_embeddings(), d = g.size(-1);
  const std::vector<int64_t> ids = gather_index(in[1], "embedding_backward");  // (N)
  check_ids(ids, v, "embedding_backward");
  const int64_t n = static_cast<int64_t>(ids.size());
  // rows grouped by id, each group in index order (a counting sort): the sum is deterministic
  std::vector<int64_t> start(static_cast<size_t>(v) + 1, 0);  // (V + 1)
  for (int64_t id : ids) ++start[static_cast<size_t>(id) + 1];
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  std::vector<int64_t> next(start.begin(), start.end() - 1);  // (V)
  std::vector<int64_t> order(static_cast<size_t>(n));         // (N) row indices sorted by id
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(next[static_cast<size_t>(ids[static_cast<size_t>(i)])]++)] = i;
  visit_float(g.dtype(), "embedding_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const std::vector<C> gc = gather<C>(g, "embedding_backward");  // (N, D)
    T* op = out[0].data_ptr<T>();                                    // (V, D)
    parallel_for(v, grain_for(d), [&](int64_t b, int64_t e) {
      std::vector<C> acc(static_cast<size_t>(d));  // (D)
      for (int64_t row = b; row < e; ++row) {
        std::fill(acc.begin(), acc.end(), C(0));
        for (int64_t k = start[static_cast<size_t>(row)]; k < start[static_cast<size_t>(row) + 1]; ++k) {
          nn::axpy(acc.data(), C(1), gc.data() + order[static_cast<size_t>(k)] * d, d);
        }
        for (int64_t j = 0; j < d; ++j) op[row * d + j] = store<T>(acc[static_cast<size_t>(j)]);
      }
    });
  });
}

// ---- rms_norm

void rms_norm_kernel(const prim::RmsNorm& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1];  // (..., D), (D)
  const int64_t d = x.size(-1);
  const std::vector<int64_t> rows = row_offsets(x);  // (R)
  visit_float(x.dtype(), "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* xp = static_cast<const T*>(x.raw_data());
    const T* wp = static_cast<const T*>(w.raw_data());
    const int64_t xs = x.strides().back(), ws = w.strides()[0];
    const C eps = static_cast<C>(p.eps());
    T* op = out[0].data_ptr<T>();  // (R, D)
    parallel_for(static_cast<int64_t>(rows.size()), grain_for(d), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T* xr = xp + rows[static_cast<size_t>(r)];
        C ss = 0;
        for (int64_t j = 0; j < d; ++j) {
          const C xv = load<C>(xr[j * xs]);
          ss += xv * xv;
        }
        const C rstd = C(1) / std::sqrt(ss / static_cast<C>(d) + eps);
        for (int64_t j = 0; j < d; ++j) op[r * d + j] = store<T>(load<C>(xr[j * xs]) * rstd * load<C>(wp[j * ws]));
      }
    });
  });
}

void rms_norm_backward_kernel(const prim::RmsNormBackward& p, const std::vector<Tensor>& in,
                              std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1], &g = in[2];  // (..., D), (D), (..., D)
  const int64_t d = x.size(-1);
  const std::vector<int64_t> xrows = row_offsets(x), grows = row_offsets(g);  // (R)
  const int64_t nrows = static_cast<int64_t>(xrows.size());
  // dw sums over rows by fixed blocks (partials then a sum in block order): deterministic for any
  // thread count
  constexpr int64_t kBlock = 32;
  const int64_t nblocks = (nrows + kBlock - 1) / kBlock;
  visit_float(x.dtype(), "rms_norm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* xp = static_cast<const T*>(x.raw_data());
    const T* wp = static_cast<const T*>(w.raw_data());
    const T* gp = static_cast<const T*>(g.raw_data());
    const int64_t xs = x.strides().back(), ws = w.strides()[0], gs = g.strides().back();
    const C eps = static_cast<C>(p.eps());
    T* dx = out[0].data_ptr<T>();  // (R, D)
    T* dw = out[1].data_ptr<T>();  // (D)
    std::vector<C> wc(static_cast<size_t>(d));  // (D)
    for (int64_t j = 0; j < d; ++j) wc[static_cast<size_t>(j)] = load<C>(wp[j * ws]);
    std::vector<C> partial(static_cast<size_t>(nblocks * d), C(0));  // (blocks, D)
    parallel_for(nblocks, grain_for(kBlock * d), [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        C* part = partial.data() + blk * d;
        for (int64_t r = blk * kBlock; r < std::min(nrows, (blk + 1) * kBlock); ++r) {
          const T* xr = xp + xrows[static_cast<size_t>(r)];
          const T* gr = gp + grows[static_cast<size_t>(r)];
          C ss = 0, gwx = 0;
          for (int64_t j = 0; j < d; ++j) {
            const C xv = load<C>(xr[j * xs]);
            ss += xv * xv;
            gwx += load<C>(gr[j * gs]) * wc[static_cast<size_t>(j)] * xv;
          }
          const C rstd = C(1) / std::sqrt(ss / static_cast<C>(d) + eps);
          // dx = rstd * w * g - x * rstd^3 * sum(g * w * x) / D
          const C c = rstd * rstd * rstd * gwx / static_cast<C>(d);
          for (int64_t j = 0; j < d; ++j) {
            const C xv = load<C>(xr[j * xs]), gv = load<C>(gr[j * gs]);
            dx[r * d + j] = store<T>(rstd * wc[static_cast<size_t>(j)] * gv - xv * c);
            part[j] += gv * xv * rstd;
          }
        }
      }
    });
    parallel_for(d, grain_for(nblocks), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        C acc = 0;
        for (int64_t blk = 0; blk < nblocks; ++blk) acc += partial[static_cast<size_t>(blk * d + j)];
        dw[j] = store<T>(acc);
      }
    });
  });
}

// ---- rotary_embedding

template <class T, class U>
void rotary_impl(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  using C = compute_t<T>;
  const int64_t h = x.size(-1) / 2;
  Shape half = x.shape();  // (..., T, D/2): one item per rotated pair
  half.back() = h;
  const StridedLoop<4> loop(half, {out.strides(), x.strides(), broadcast_strides(cos, half), broadcast_strides(sin, half)});
  const int64_t xh = h * x.strides().back(), oh = h * out.strides().back();  // offset of a pair's second half
  const T* xp = static_cast<const T*>(x.raw_data());
  const U* cp = static_cast<const U*>(cos.raw_data());
  const U* sp = static_cast<const U*>(sin.raw_data());
  T* op = out.data_ptr<T>();
  loop.run([&](const std::array<int64_t, 4>& off, int64_t n, const std::array<int64_t, 4>& st) {
    for (int64_t i = 0; i < n; ++i) {
      const T* xi = xp + off[1] + i * st[1];
      T* oi = op + off[0] + i * st[0];
      const C c = load<C>(cp[off[2] + i * st[2]]), s = load<C>(sp[off[3] + i * st[3]]);
      const C a = load<C>(xi[0]), b = load<C>(xi[xh]);
      oi[0] = store<T>(a * c - b * s);
      oi[oh] = store<T>(b * c + a * s);
    }
  });
}

void rotary_kernel(const prim::RotaryEmbedding&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &cos = in[1], &sin = in[2];
  visit_float(x.dtype(), "rotary_embedding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (cos.dtype() == x.dtype()) rotary_impl<T, T>(x, cos, sin, out[0]);
    else rotary_impl<T, float>(x, cos, sin, out[0]);
  });
}

// ---- cross_entropy

// Targets as int64, each either ignore_index or in [0, V).
std::vector<int64_t> checked_targets(const Tensor& targets, int64_t v, int64_t ignore_index) {
  std::vector<int64_t> t = gather_index(targets, "cross_entropy");  // (N)
  for (size_t n = 0; n < t.size(); ++n) {
    KILN_CHECK(t[n] == ignore_index || (t[n] >= 0 && t[n] < v), "cross_entropy",
               "target {} at row {} is out of range [0, {}) and is not ignore_index ({})", t[n], n, v, ignore_index);
  }
  return t;
}

// log(sum(exp(row))) of one strided row of v elements.
template <class C, class T> C row_logsumexp(const T* row, int64_t v, int64_t stride) {
  C m = -std::numeric_limits<C>::infinity();
  for (int64_t j = 0; j < v; ++j) m = std::max(m, load<C>(row[j * stride]));
  C l = 0;
  for (int64_t j = 0; j < v; ++j) l += std::exp(load<C>(row[j * stride]) - m);
  return m + std::log(l);
}

void cross_entropy_kernel(const prim::CrossEntropy& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& logits = in[0];  // (N, V)
  const int64_t n = logits.size(0), v = logits.size(1);
  const std::vector<int64_t> t = checked_targets(in[1], v, p.ignore_index());
  visit_float(logits.dtype(), "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* lp = static_cast<const T*>(logits.raw_data());
    const int64_t s0 = logits.strides()[0], s1 = logits.strides()[1];
    std::vector<C> loss(static_cast<size_t>(n), C(0));  // (N), 0 at ignored rows
    parallel_for(n, grain_for(v), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t tr = t[static_cast<size_t>(r)];
        if (tr == p.ignore_index()) continue;
        const T* row = lp + r * s0;
        loss[static_cast<size_t>(r)] = row_logsumexp<C>(row, v, s1) - load<C>(row[tr * s1]);
      }
    });
    T* op = out[0].data_ptr<T>();
    if (p.reduction() == Reduction::none) {
      for (int64_t r = 0; r < n; ++r) op[r] = store<T>(loss[static_cast<size_t>(r)]);
      return;
    }
    double total = 0;  // summed in row order
    int64_t count = 0;
    for (int64_t r = 0; r < n; ++r) {
      total += static_cast<double>(loss[static_cast<size_t>(r)]);
      count += t[static_cast<size_t>(r)] != p.ignore_index();
    }
    if (p.reduction() == Reduction::mean) total = count == 0 ? 0.0 : total / static_cast<double>(count);
    op[0] = store<T>(static_cast<C>(total));
  });
}

void cross_entropy_backward_kernel(const prim::CrossEntropyBackward& p, const std::vector<Tensor>& in,
                                   std::vector<Tensor>& out) {
  const Tensor& logits = in[0];  // (N, V)
  const int64_t n = logits.size(0), v = logits.size(1);
  const std::vector<int64_t> t = checked_targets(in[1], v, p.ignore_index());
  int64_t count = 0;
  for (int64_t tr : t) count += tr != p.ignore_index();
  visit_float(logits.dtype(), "cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const std::vector<C> g = gather<C>(in[2], "cross_entropy_backward");  // (N) or (1)
    const T* lp = static_cast<const T*>(logits.raw_data());
    const int64_t s0 = logits.strides()[0], s1 = logits.strides()[1];
    T* op = out[0].data_ptr<T>();  // (N, V)
    parallel_for(n, grain_for(v), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* orow = op + r * v;
        const int64_t tr = t[static_cast<size_t>(r)];
        if (tr == p.ignore_index()) {
          std::fill(orow, orow + v, store<T>(C(0)));
          continue;
        }
        C scale = p.reduction() == Reduction::none ? g[static_cast<size_t>(r)] : g[0];
        if (p.reduction() == Reduction::mean) scale /= static_cast<C>(count);
        const T* row = lp + r * s0;
        const C lse = row_logsumexp<C>(row, v, s1);
        for (int64_t j = 0; j < v; ++j) {
          const C prob = std::exp(load<C>(row[j * s1]) - lse);
          orow[j] = store<T>((prob - (j == tr ? C(1) : C(0))) * scale);
        }
      }
    });
  });
}

// ---- swiglu

void swiglu_kernel(const prim::SwiGlu&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1];  // (...), (...)
  visit_float(gate.dtype(), "swiglu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const StridedLoop<3> loop(gate.shape(), {out[0].strides(), gate.strides(), up.strides()});
    const T* gp = static_cast<const T*>(gate.raw_data());
    const T* up_ = static_cast<const T*>(up.raw_data());
    T* op = out[0].data_ptr<T>();
    loop.run([&](const std::array<int64_t, 3>& off, int64_t n, const std::array<int64_t, 3>& st) {
      for (int64_t i = 0; i < n; ++i) {
        const C a = load<C>(gp[off[1] + i * st[1]]), b = load<C>(up_[off[2] + i * st[2]]);
        op[off[0] + i * st[0]] = store<T>(a / (C(1) + std::exp(-a)) * b);
      }
    });
  });
}

void swiglu_backward_kernel(const prim::SwiGluBackward&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1], &g = in[2];  // (...) each
  visit_float(gate.dtype(), "swiglu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const StridedLoop<5> loop(gate.shape(), {out[0].strides(), out[1].strides(), gate.strides(), up.strides(), g.strides()});
    const T* gp = static_cast<const T*>(gate.raw_data());
    const T* up_ = static_cast<const T*>(up.raw_data());
    const T* dp = static_cast<const T*>(g.raw_data());
    T* dgate = out[0].data_ptr<T>();
    T* dup = out[1].data_ptr<T>();
    loop.run([&](const std::array<int64_t, 5>& off, int64_t n, const std::array<int64_t, 5>& st) {
      for (int64_t i = 0; i < n; ++i) {
        const C a = load<C>(gp[off[2] + i * st[2]]), b = load<C>(up_[off[3] + i * st[3]]);
        const C gv = load<C>(dp[off[4] + i * st[4]]);
        const C sig = C(1) / (C(1) + std::exp(-a));
        dgate[off[0] + i * st[0]] = store<T>(gv * b * sig * (C(1) + a * (C(1) - sig)));
        dup[off[1] + i * st[1]] = store<T>(gv * a * sig);
      }
    });
  });
}

}  // namespace

KILN_REGISTER(cpu_nn_kernels) {
  register_kernel<prim::Embedding>(DeviceType::cpu, &embedding_kernel);
  register_kernel<prim::EmbeddingBackward>(DeviceType::cpu, &embedding_backward_kernel);
  register_kernel<prim::RmsNorm>(DeviceType::cpu, &rms_norm_kernel);
  register_kernel<prim::RmsNormBackward>(DeviceType::cpu, &rms_norm_backward_kernel);
  register_kernel<prim::RotaryEmbedding>(DeviceType::cpu, &rotary_kernel);
  register_kernel<prim::CrossEntropy>(DeviceType::cpu, &cross_entropy_kernel);
  register_kernel<prim::CrossEntropyBackward>(DeviceType::cpu, &cross_entropy_backward_kernel);
  register_kernel<prim::SwiGlu>(DeviceType::cpu, &swiglu_kernel);
  register_kernel<prim::SwiGluBackward>(DeviceType::cpu, &swiglu_backward_kernel);
}

}  // namespace kiln::cpu

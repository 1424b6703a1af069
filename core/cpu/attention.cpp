// CPU kernels of scaled dot-product attention: forward (one query row at a time, two passes over
// its keys: scores and max, then exp-sum and the weighted sum of values) and backward (dq by query
// rows, then dk/dv by key rows, recomputing probabilities from lse, so every sum runs in a fixed
// order without atomics).
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/cpu/copy.h"
#include "core/cpu/fused_common.h"
#include "core/cpu/parallel.h"
#include "core/dispatch.h"
#include "core/ops/attention.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::axpy;
using fused::dot;
using fused::gather;
using fused::gather_transposed;
using fused::store;
using fused::visit_float;

// The layout every attention kernel works on, read from q (B, Hq, T, D) and v (B, Hkv, S, Dv).
struct Dims {
  int64_t b, hq, t, d, hkv, s, dv, group;
  Dims(const Tensor& q, const Tensor& v)
      : b(q.size(0)), hq(q.size(1)), t(q.size(2)), d(q.size(3)), hkv(v.size(1)), s(v.size(2)), dv(v.size(3)),
        group(hq / std::max<int64_t>(hkv, 1)) {}
  // Number of keys query t sees: all of them, or s' <= t + S - T when causal.
  int64_t visible(bool causal, int64_t ti) const { return causal ? std::clamp<int64_t>(ti + s - t + 1, 0, s) : s; }
  // First query that sees key si (causal) or 0.
  int64_t first_query(bool causal, int64_t si) const { return causal ? std::max<int64_t>(0, si - s + t) : 0; }
  // Flat kv row (B, Hkv, S) index of key si for query row (bi, hi).
  int64_t kv_row(int64_t bi, int64_t hi, int64_t si) const { return (bi * hkv + hi / group) * s + si; }
};

int64_t grain_for(int64_t work_per_item) { return fused::grain_for(work_per_item, 32768); }

// Scores of one query against keys [0, n) are built as axpys over a transposed K (D, S), which
// vectorise, instead of n dot products, which do not (float sums are not reassociated).

template <class T>
void sdpa_forward_impl(const prim::ScaledDotProductAttention& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  using C = compute_t<T>;
  const Dims dm(in[0], in[2]);
  const std::vector<C> q = gather<C>(in[0], p.name());             // (B, Hq, T, D)
  const std::vector<C> kt = gather_transposed<C>(in[1], p.name());  // (B, Hkv, D, S)
  const std::vector<C> v = gather<C>(in[2], p.name());             // (B, Hkv, S, Dv)
  T* op = out[0].data_ptr<T>();                                     // (B, Hq, T, Dv)
  C* lse = out[1].data_ptr<C>();                                    // (B, Hq, T)
  const C scale = static_cast<C>(p.scale());
  const int64_t rows = dm.b * dm.hq * dm.t;
  parallel_for(rows, grain_for(dm.s * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
    std::vector<C> score(static_cast<size_t>(dm.s));  // (S)
    std::vector<C> acc(static_cast<size_t>(dm.dv));   // (Dv)
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ti = r % dm.t, hi = (r / dm.t) % dm.hq, bi = r / (dm.t * dm.hq);
      const int64_t n = dm.visible(p.causal(), ti);
      const int64_t kv0 = dm.kv_row(bi, hi, 0);  // first key of this head's kv head in (B, Hkv, S)
      const C* qr = q.data() + r * dm.d;
      const C* ktr = kt.data() + kv0 * dm.d;    // (D, S) block of this kv head
      T* orow = op + r * dm.dv;
      if (n == 0) {  // sees no key: zeros, lse = -inf
        std::fill(orow, orow + dm.dv, store<T>(C(0)));
        lse[r] = -std::numeric_limits<C>::infinity();
        continue;
      }
      std::fill(score.begin(), score.begin() + n, C(0));
      for (int64_t j = 0; j < dm.d; ++j) axpy(score.data(), scale * qr[j], ktr + j * dm.s, n);
      const C m = *std::max_element(score.begin(), score.begin() + n);
      C l = 0;
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t si = 0; si < n; ++si) {
        const C w = std::exp(score[static_cast<size_t>(si)] - m);
        l += w;
        axpy(acc.data(), w, v.data() + (kv0 + si) * dm.dv, dm.dv);
      }
      for (int64_t j = 0; j < dm.dv; ++j) orow[j] = store<T>(acc[static_cast<size_t>(j)] / l);
      lse[r] = m + std::log(l);
    }
  });
}

template <class T>
void sdpa_backward_impl(const prim::SdpaBackward& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  using C = compute_t<T>;
  const char* op = p.name();
  const Dims dm(in[0], in[2]);
  const std::vector<C> q = gather<C>(in[0], op);                // (B, Hq, T, D)
  const std::vector<C> qt = gather_transposed<C>(in[0], op);    // (B, Hq, D, T)
  const std::vector<C> k = gather<C>(in[1], op);                // (B, Hkv, S, D)
  const std::vector<C> kt = gather_transposed<C>(in[1], op);    // (B, Hkv, D, S)
  const std::vector<C> v = gather<C>(in[2], op);                // (B, Hkv, S, Dv)
  const std::vector<C> vt = gather_transposed<C>(in[2], op);    // (B, Hkv, Dv, S)
  const std::vector<C> o = gather<C>(in[3], op);                // (B, Hq, T, Dv)
  const std::vector<C> lse = gather<C>(in[4], op);              // (B, Hq, T)
  const std::vector<C> dout = gather<C>(in[5], op);             // (B, Hq, T, Dv)
  const std::vector<C> doutt = gather_transposed<C>(in[5], op);  // (B, Hq, Dv, T)
  const std::vector<C> dlse = gather<C>(in[6], op);             // (B, Hq, T)
  T* dq = out[0].data_ptr<T>();                                 // (B, Hq, T, D)
  T* dk = out[1].data_ptr<T>();                                 // (B, Hkv, S, D)
  T* dv = out[2].data_ptr<T>();                                 // (B, Hkv, S, Dv)
  const C scale = static_cast<C>(p.scale());
  const int64_t rows = dm.b * dm.hq * dm.t;

  // delta = rowsum(dout * out) - dlse, so that dscore = prob * (dout . v - delta)
  std::vector<C> delta(static_cast<size_t>(rows));  // (B, Hq, T)
  parallel_for(rows, grain_for(dm.dv), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      delta[static_cast<size_t>(r)] =
          dot(dout.data() + r * dm.dv, o.data() + r * dm.dv, dm.dv) - dlse[static_cast<size_t>(r)];
    }
  });

  // dq: one query row at a time, over the keys it sees
  parallel_for(rows, grain_for(dm.s * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
    std::vector<C> ds(static_cast<size_t>(dm.s)), dp(static_cast<size_t>(dm.s));  // (S)
    std::vector<C> acc(static_cast<size_t>(dm.d));                                 // (D)
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ti = r % dm.t, hi = (r / dm.t) % dm.hq, bi = r / (dm.t * dm.hq);
      const int64_t n = dm.visible(p.causal(), ti), kv0 = dm.kv_row(bi, hi, 0);
      std::fill(ds.begin(), ds.begin() + n, C(0));  // scores, then dscores
      std::fill(dp.begin(), dp.begin() + n, C(0));
      for (int64_t j = 0; j < dm.d; ++j) axpy(ds.data(), scale * q[static_cast<size_t>(r * dm.d + j)], kt.data() + (kv0 * dm.d + j * dm.s), n);
      for (int64_t j = 0; j < dm.dv; ++j) axpy(dp.data(), dout[static_cast<size_t>(r * dm.dv + j)], vt.data() + (kv0 * dm.dv + j * dm.s), n);
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t si = 0; si < n; ++si) {
        const size_t i = static_cast<size_t>(si);
        const C prob = std::exp(ds[i] - lse[static_cast<size_t>(r)]);
        axpy(acc.data(), prob * (dp[i] - delta[static_cast<size_t>(r)]), k.data() + (kv0 + si) * dm.d, dm.d);
      }
      for (int64_t j = 0; j < dm.d; ++j) dq[r * dm.d + j] = store<T>(scale * acc[static_cast<size_t>(j)]);
    }
  });

  // dk, dv: one key row at a time, summing over the query heads of its group and the queries seeing it
  const int64_t kv_rows = dm.b * dm.hkv * dm.s;
  parallel_for(kv_rows, grain_for(dm.group * dm.t * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
    std::vector<C> sc(static_cast<size_t>(dm.t)), dp(static_cast<size_t>(dm.t));  // (T)
    std::vector<C> acc_k(static_cast<size_t>(dm.d));                                // (D)
    std::vector<C> acc_v(static_cast<size_t>(dm.dv));                               // (Dv)
    for (int64_t kr = begin; kr < end; ++kr) {
      const int64_t si = kr % dm.s, kh = (kr / dm.s) % dm.hkv, bi = kr / (dm.s * dm.hkv);
      const int64_t t0 = dm.first_query(p.causal(), si), n = dm.t - t0;
      const C* kr_row = k.data() + kr * dm.d;
      const C* vr_row = v.data() + kr * dm.dv;
      std::fill(acc_k.begin(), acc_k.end(), C(0));
      std::fill(acc_v.begin(), acc_v.end(), C(0));
      for (int64_t hi = kh * dm.group; hi < (kh + 1) * dm.group; ++hi) {
        const int64_t r0 = (bi * dm.hq + hi) * dm.t;  // query row of (bi, hi, 0)
        if (n <= 0) continue;
        std::fill(sc.begin(), sc.begin() + n, C(0));
        std::fill(dp.begin(), dp.begin() + n, C(0));
        for (int64_t j = 0; j < dm.d; ++j) axpy(sc.data(), scale * kr_row[j], qt.data() + ((r0 * dm.d) + j * dm.t + t0), n);
        for (int64_t j = 0; j < dm.dv; ++j) axpy(dp.data(), vr_row[j], doutt.data() + ((r0 * dm.dv) + j * dm.t + t0), n);
        for (int64_t i = 0; i < n; ++i) {
          const size_t r = static_cast<size_t>(r0 + t0 + i);
          const C prob = std::exp(sc[static_cast<size_t>(i)] - lse[r]);
          axpy(acc_v.data(), prob, dout.data() + r * static_cast<size_t>(dm.dv), dm.dv);
          axpy(acc_k.data(), prob * (dp[static_cast<size_t>(i)] - delta[r]), q.data() + r * static_cast<size_t>(dm.d), dm.d);
        }
      }
      for (int64_t j = 0; j < dm.d; ++j) dk[kr * dm.d + j] = store<T>(scale * acc_k[static_cast<size_t>(j)]);
      for (int64_t j = 0; j < dm.dv; ++j) dv[kr * dm.dv + j] = store<T>(acc_v[static_cast<size_t>(j)]);
    }
  });
}

// The kernels read any strides and write contiguous (B, H, T, D) outputs. heads_last: operands are
// viewed as (B, H, T, D) (swapped strides), outputs computed into contiguous buffers and copied into
// the (B, T, H, D) ones.
template <class P, class Impl>
void run_in_heads_layout(const P& p, const std::vector<Tensor>& in, std::vector<Tensor>& out,
                         const std::vector<size_t>& heads_inputs, size_t heads_outputs, Impl impl) {
  if (!p.heads_last()) {
    impl(in, out);
    return;
  }
  std::vector<Tensor> in2 = in, out2 = out;
  for (size_t i : heads_inputs) in2[i] = prim::sdpa_heads_view(in[i]);
  for (size_t i = 0; i < heads_outputs; ++i) {
    const Tensor v = prim::sdpa_heads_view(out[i]);
    out2[i] = empty(v.shape(), v.dtype(), v.device());  // (B, H, T, D)
  }
  impl(in2, out2);
  for (size_t i = 0; i < heads_outputs; ++i) copy_into(prim::sdpa_heads_view(out[i]), out2[i]);
}

void sdpa_forward_kernel(const prim::ScaledDotProductAttention& p, const std::vector<Tensor>& in,
                         std::vector<Tensor>& out) {
  run_in_heads_layout(p, in, out, {0, 1, 2}, 1, [&](const std::vector<Tensor>& i, std::vector<Tensor>& o) {
    visit_float(i[0].dtype(), p.name(), [&](auto tag) { sdpa_forward_impl<typename decltype(tag)::type>(p, i, o); });
  });
}

void sdpa_backward_kernel(const prim::SdpaBackward& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  // q, k, v, out, dout are (B, T, H, D) with heads_last; lse, dlse (B, Hq, T) either way
  run_in_heads_layout(p, in, out, {0, 1, 2, 3, 5}, 3, [&](const std::vector<Tensor>& i, std::vector<Tensor>& o) {
    visit_float(i[0].dtype(), p.name(), [&](auto tag) { sdpa_backward_impl<typename decltype(tag)::type>(p, i, o); });
  });
}

}  // namespace

KILN_REGISTER(cpu_attention_kernels) {
  register_kernel<prim::ScaledDotProductAttention>(DeviceType::cpu, &sdpa_forward_kernel);
  register_kernel<prim::SdpaBackward>(DeviceType::cpu, &sdpa_backward_kernel);
}

}  // namespace kiln::cpu

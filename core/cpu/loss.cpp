// CPU kernels of cross-entropy, forward (per-row log-sum-exp minus the target logit, reduced in row
// order), backward (softmax minus one-hot, scaled) and both in one pass (CrossEntropyLossGrad). Targets are always range-checked here.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/cpu/fused_common.h"
#include "core/cpu/parallel.h"
#include "core/dispatch.h"
#include "core/ops/loss.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::gather;
using fused::gather_index;
using fused::grain_for;
using fused::load;
using fused::store;
using fused::visit_float;

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

// Loss and gradient in one pass; out[1] may be the logits themselves (each row's statistics and
// target logit are read before the row is written).
void cross_entropy_loss_grad_kernel(const prim::CrossEntropyLossGrad& p, const std::vector<Tensor>& in,
                                    std::vector<Tensor>& out) {
  const Tensor& logits = in[0];  // (N, V)
  const int64_t n = logits.size(0), v = logits.size(1);
  const std::vector<int64_t> t = checked_targets(in[1], v, p.ignore_index());
  visit_float(logits.dtype(), "cross_entropy_loss_grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const C scale = gather<C>(in[2], "cross_entropy_loss_grad")[0];
    const C s = static_cast<C>(p.label_smoothing()), z = static_cast<C>(p.z_loss_weight());
    const T* lp = static_cast<const T*>(logits.raw_data());
    const int64_t s0 = logits.strides()[0], s1 = logits.strides()[1];
    C* loss = out[0].data_ptr<C>();  // (N)
    T* op = out[1].data_ptr<T>();    // (N, V), possibly lp
    parallel_for(n, grain_for(v), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* orow = op + r * v;
        const int64_t tr = t[static_cast<size_t>(r)];
        if (tr == p.ignore_index()) {
          loss[r] = 0;
          std::fill(orow, orow + v, store<T>(C(0)));
          continue;
        }
        const T* row = lp + r * s0;
        const C lse = row_logsumexp<C>(row, v, s1);
        C total = 0;
        for (int64_t j = 0; j < v; ++j) total += load<C>(row[j * s1]);
        const C xt = load<C>(row[tr * s1]);
        loss[r] = (1 - s) * (lse - xt) + s * (lse - total / static_cast<C>(v)) + z * lse * lse;
        const C gain = 1 + 2 * z * lse, uniform = s / static_cast<C>(v);
        for (int64_t j = 0; j < v; ++j) {
          const C prob = std::exp(load<C>(row[j * s1]) - lse);
          orow[j] = store<T>((prob * gain - uniform - (j == tr ? 1 - s : C(0))) * scale);
        }
      }
    });
  });
}

}  // namespace

KILN_REGISTER(cpu_loss_kernels) {
  register_kernel<prim::CrossEntropy>(DeviceType::cpu, &cross_entropy_kernel);
  register_kernel<prim::CrossEntropyBackward>(DeviceType::cpu, &cross_entropy_backward_kernel);
  register_kernel<prim::CrossEntropyLossGrad>(DeviceType::cpu, &cross_entropy_loss_grad_kernel);
}

}  // namespace kiln::cpu

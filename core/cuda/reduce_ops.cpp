// Host side of the CUDA reductions: builds the reduction layout of a tensor (kept dims in order,
// reduced dims by decreasing stride, size-1 dims dropped, contiguous dims merged), allocates split
// workspaces, launches on the device's current stream and registers the kernels with the dispatcher.
#include <algorithm>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/reduce.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/reduce.h"

namespace kiln::cuda {
namespace {

struct Dim {
  int64_t size, stride;
};

// Drops size-1 dims, merges neighbours that are contiguous with each other, and fills `out`.
int64_t squash(const std::vector<Dim>& dims, Strided<1>& out, const char* op) {
  std::vector<Dim> merged;
  int64_t n = 1;
  for (const Dim& d : dims) {
    n *= d.size;
    if (d.size == 1) continue;
    if (!merged.empty() && merged.back().stride == d.stride * d.size) {
      merged.back() = {merged.back().size * d.size, d.stride};
    } else {
      merged.push_back(d);
    }
  }
  KILN_CHECK(merged.size() <= static_cast<size_t>(kMaxDims), op,
             "needs more than {} dims after merging ({}); make the input contiguous", kMaxDims, merged.size());
  out.ndim = static_cast<int>(merged.size());
  for (size_t k = 0; k < merged.size(); ++k) {
    out.shape[k] = merged[k].size;
    out.strides[0][k] = merged[k].stride;
  }
  return n;
}

// `dims`: the reduced dims of x, sorted. Reduced dims are walked largest stride first (memory order).
ReduceLayout reduce_layout(const Tensor& x, const std::vector<int64_t>& dims, const char* op) {
  std::vector<Dim> outer, red;
  size_t k = 0;
  for (size_t d = 0; d < x.shape().size(); ++d) {
    const bool reduced = k < dims.size() && dims[k] == static_cast<int64_t>(d);
    if (reduced) ++k;
    (reduced ? red : outer).push_back({x.shape()[d], x.strides()[d]});
  }
  std::stable_sort(red.begin(), red.end(), [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
  ReduceLayout L;
  L.n_out = squash(outer, L.outer, op);
  L.n_red = squash(red, L.red, op);
  return L;
}

DType stats_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

// Runs reduction `kind` of x over L into out (and out2 for softmax statistics).
void run_reduce(RedOp kind, const Tensor& x, const ReduceLayout& L, void* out, void* out2, const char* op) {
  const void* xp = x.numel() > 0 ? x.raw_data() : nullptr;
  const ReducePlan plan = plan_reduce(kind, x.dtype(), L, xp);
  Tensor workspace;  // (chunks, n_out) partials; freed in stream order after the launch
  if (plan.workspace_bytes > 0) workspace = empty({static_cast<int64_t>(plan.workspace_bytes)}, DType::u8, x.device());
  KILN_CUDA_CHECK(launch_reduce(kind, x.dtype(), xp, L, plan, out, out2,
                                workspace.defined() ? workspace.raw_data() : nullptr, stream_of(x)),
                  op);
}

void reduce_kernel(const prim::Reduce& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  RedOp kind = RedOp::sum;
  switch (p.kind()) {
    case prim::ReduceKind::sum: kind = RedOp::sum; break;
    case prim::ReduceKind::mean: kind = RedOp::mean; break;
    case prim::ReduceKind::max: kind = RedOp::max; break;
    case prim::ReduceKind::min: kind = RedOp::min; break;
  }
  run_reduce(kind, in[0], reduce_layout(in[0], p.dims(), p.name()), y.raw_data(), nullptr, p.name());
}

void argmax_kernel(const prim::ArgMax& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  std::vector<int64_t> dims;
  if (in[0].dim() > 0) dims.push_back(p.dim());
  run_reduce(RedOp::argmax, in[0], reduce_layout(in[0], dims, "argmax"), y.raw_data(), nullptr, "argmax");
}

void logsumexp_kernel(const prim::LogSumExp& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  run_reduce(RedOp::logsumexp, in[0], reduce_layout(in[0], p.dims(), "logsumexp"), y.raw_data(), nullptr, "logsumexp");
}

// Rows of the softmax dim contiguous in x and y go to the row kernel; other layouts (and a few long
// rows, which the split reduction spreads over the GPU) take statistics, then an elementwise pass.
void softmax_kernel(const prim::Softmax& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  Tensor& y = out[0];  // (x.shape) contiguous
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  std::vector<int64_t> dims;
  if (x.dim() > 0) dims.push_back(p.dim());
  const ReduceLayout L = reduce_layout(x, dims, p.name());
  bool last = true;  // every dim after the softmax dim has size 1: rows of y are contiguous
  for (int64_t d = p.dim() + 1; d < x.dim(); ++d) last = last && x.shape()[static_cast<size_t>(d)] == 1;
  const bool rows = L.red.ndim == 0 || (L.red.ndim == 1 && L.red.strides[0][0] == 1);
  if (rows && last && softmax_rows_fits(L.n_out, L.n_red)) {
    KILN_CUDA_CHECK(launch_softmax_rows(x.dtype(), p.log(), x.raw_data(), L.outer, L.n_out, L.n_red, y.raw_data(),
                                        stream_of(y)),
                    p.name());
    return;
  }
  Shape keep = x.shape();
  if (x.dim() > 0) keep[static_cast<size_t>(p.dim())] = 1;
  Tensor shift = empty(keep, stats_dtype(x.dtype()), x.device());  // (keep)
  Tensor scale = empty(keep, stats_dtype(x.dtype()), x.device());  // (keep)
  run_reduce(p.log() ? RedOp::log_softmax_stats : RedOp::softmax_stats, x, L, shift.raw_data(), scale.raw_data(),
             p.name());
  const Strided<4> st = make_strided<4>(x.shape(), {&y, &x, &shift, &scale}, p.name());
  KILN_CUDA_CHECK(launch_softmax_apply(x.dtype(), p.log(), y.raw_data(), x.raw_data(), shift.raw_data(),
                                       scale.raw_data(), st, y.numel(), stream_of(y)),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_reduce_kernels) {
  register_kernel<prim::Reduce>(DeviceType::cuda, &reduce_kernel);
  register_kernel<prim::ArgMax>(DeviceType::cuda, &argmax_kernel);
  register_kernel<prim::LogSumExp>(DeviceType::cuda, &logsumexp_kernel);
  register_kernel<prim::Softmax>(DeviceType::cuda, &softmax_kernel);
}

}  // namespace kiln::cuda

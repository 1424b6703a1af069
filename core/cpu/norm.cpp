// CPU kernels of RMSNorm, forward and backward (dw summed over fixed blocks of rows, so it is
// deterministic for any thread count). Inputs may be any strided view; bf16/f16/f32 compute in f32.
#include <algorithm>
#include <cmath>

#include "core/cpu/fused_common.h"
#include "core/cpu/parallel.h"
#include "core/dispatch.h"
#include "core/ops/norm.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::grain_for;
using fused::load;
using fused::row_offsets;
using fused::store;
using fused::visit_float;

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
    const Tensor addend = in.size() > 3 ? in[3].contiguous() : Tensor();  // (R, D) or none
    const T* ap = addend.defined() ? static_cast<const T*>(addend.raw_data()) : nullptr;
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
            const C sum = rstd * wc[static_cast<size_t>(j)] * gv - xv * c;
            dx[r * d + j] = store<T>(ap ? sum + load<C>(ap[r * d + j]) : sum);
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

}  // namespace

KILN_REGISTER(cpu_norm_kernels) {
  register_kernel<prim::RmsNorm>(DeviceType::cpu, &rms_norm_kernel);
  register_kernel<prim::RmsNormBackward>(DeviceType::cpu, &rms_norm_backward_kernel);
}

}  // namespace kiln::cpu

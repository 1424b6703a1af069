// CPU kernels for copy (contiguous/cast/device/copy_), fill, cat and slice_backward.
#include "core/cpu/copy.h"

#include <cstring>

#include "core/registry.h"
#include "core/cpu/strided.h"
#include "core/dispatch.h"
#include "core/ops/copy.h"

namespace kiln::cpu {

Tensor raw_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset) {
  auto t = std::make_shared<TensorImpl>(*base.impl());
  t->shape = shape;
  t->strides = strides;
  t->offset = offset;
  t->grad.reset();
  t->grad_fn.reset();
  t->requires_grad = false;
  return Tensor(t);
}

void copy_into(const Tensor& dst, const Tensor& src) {
  KILN_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "copy", "CPU copy got {} -> {}", src.device().str(),
             dst.device().str());
  if (dst.numel() == 0) return;
  StridedLoop<2> loop(dst.shape(), {dst.strides(), broadcast_strides(src, dst.shape())});
  visit_dtype(dst.dtype(), [&](auto dt) {
    using D = typename decltype(dt)::type;
    visit_dtype(src.dtype(), [&](auto st) {
      using S = typename decltype(st)::type;
      D* d = static_cast<D*>(dst.raw_data());
      const S* s = static_cast<const S*>(src.raw_data());
      loop.run([&](const std::array<int64_t, 2>& off, int64_t n, const std::array<int64_t, 2>& inc) {
        D* dp = d + off[0];
        const S* sp = s + off[1];
        if constexpr (std::is_same_v<D, S>) {
          if (inc[0] == 1 && inc[1] == 1) {
            std::memcpy(static_cast<void*>(dp), static_cast<const void*>(sp), static_cast<size_t>(n) * sizeof(D));
            return;
          }
        }
        for (int64_t i = 0; i < n; ++i) dp[i * inc[0]] = convert<D>(sp[i * inc[1]]);
      });
    });
  });
}

namespace {

void copy_kernel(const prim::Copy&, const std::vector<Tensor>& in, std::vector<Tensor>& out) { copy_into(out[0], in[0]); }

void fill_kernel(const prim::Fill& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const Tensor& t = out[0];
  if (t.numel() == 0) return;
  StridedLoop<1> loop(t.shape(), {t.strides()});
  visit_dtype(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T v = convert<T>(op.value());
    T* p = static_cast<T*>(t.raw_data());
    loop.run([&](const std::array<int64_t, 1>& off, int64_t n, const std::array<int64_t, 1>& inc) {
      for (int64_t i = 0; i < n; ++i) p[off[0] + i * inc[0]] = v;
    });
  });
}

void cat_kernel(const prim::Cat& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& o = out[0];
  size_t d = static_cast<size_t>(op.dim());
  int64_t at = 0;
  for (const Tensor& t : in) {
    Shape s = o.shape();
    s[d] = t.shape()[d];
    copy_into(raw_view(o, s, o.strides(), o.offset() + at * o.strides()[d]), t);
    at += t.shape()[d];
  }
}

void slice_backward_kernel(const prim::SliceBackward& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& o = out[0];
  visit_dtype(o.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(o.raw_data());
    std::fill(p, p + o.numel(), convert<T>(0.0));
  });
  const Tensor& g = in[0];
  size_t d = static_cast<size_t>(op.dim());
  if (g.numel() == 0) return;
  Shape st = o.strides();
  st[d] *= op.step();
  copy_into(raw_view(o, g.shape(), st, o.offset() + op.start() * o.strides()[d]), g);
}

}  // namespace

KILN_REGISTER(cpu_copy_kernels) {
  register_kernel<prim::Copy>(DeviceType::cpu, &copy_kernel);
  register_kernel<prim::Fill>(DeviceType::cpu, &fill_kernel);
  register_kernel<prim::Cat>(DeviceType::cpu, &cat_kernel);
  register_kernel<prim::SliceBackward>(DeviceType::cpu, &slice_backward_kernel);
}

}  // namespace kiln::cpu

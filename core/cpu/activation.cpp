// CPU kernels of SwiGLU, forward and backward, over any strided operands; bf16/f16/f32 compute in
// f32, f64 in f64, rounded once.
#include <cmath>

#include "core/cpu/fused_common.h"
#include "core/dispatch.h"
#include "core/ops/activation.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::load;
using fused::store;
using fused::visit_float;

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

KILN_REGISTER(cpu_activation_kernels) {
  register_kernel<prim::SwiGlu>(DeviceType::cpu, &swiglu_kernel);
  register_kernel<prim::SwiGluBackward>(DeviceType::cpu, &swiglu_backward_kernel);
}

}  // namespace kiln::cpu

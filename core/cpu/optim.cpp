// CPU kernel of prim::AdamWStep: the reference AdamW update, element by element in f32 with the same
// operation order and explicit fused multiply-adds as the CUDA kernel (so both round identically).
#include <cmath>

#include "core/cpu/parallel.h"
#include "core/cpu/register.h"
#include "core/dispatch.h"
#include "core/ops/optim.h"

namespace kiln::cpu {
namespace {

struct AdamWScalars {
  float decay, w1, b2, c2, eps, step_size, bc2_sqrt;
};

// One element; the CUDA kernel (core/cuda/optim.cu) performs exactly these roundings.
inline void adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  p = p * s.decay;
  m = std::fma(s.w1, g - m, m);       // lerp(m, g, 1 - beta1)
  v = std::fma(v, s.b2, s.c2 * (g * g));  // beta2 v + (1 - beta2) g^2
  const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  p = std::fma(-s.step_size, m / denom, p);
}

template <class T>
void adamw_tensor(T* p, const T* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float pf = static_cast<float>(p[i]);
      adamw_element(pf, static_cast<float>(g[i]), m[i], v[i], s);
      p[i] = convert<T>(pf);
    }
  });
}

void adamw_kernel(const prim::AdamWStep& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const size_t n = in.size();
  const AdamWHyper& h = op.hyper();
  for (size_t i = 0; i < n; ++i) {
    const Tensor &g = in[i], &p = out[i], &m = out[n + i], &v = out[2 * n + i];
    KILN_CHECK(g.is_contiguous() && p.is_contiguous() && m.is_contiguous() && v.is_contiguous(), "adamw_step",
               "tensor {}: param, grad and state must be contiguous", i);
    if (p.numel() == 0) continue;
    const AdamWScalars s{op.decay(),
                         static_cast<float>(1.0 - h.beta1),
                         static_cast<float>(h.beta2),
                         static_cast<float>(1.0 - h.beta2),
                         static_cast<float>(h.eps),
                         op.step_size(i),
                         op.bias_correction2_sqrt(i)};
    float* mp = static_cast<float*>(m.raw_data());
    float* vp = static_cast<float*>(v.raw_data());
    visit_dtype(p.dtype(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
        adamw_tensor(static_cast<T*>(p.raw_data()), static_cast<const T*>(g.raw_data()), mp, vp, p.numel(), s);
      } else {
        KILN_FAIL("adamw_step", "unsupported parameter dtype {}", dtype_name(p.dtype()));
      }
    });
  }
}

}  // namespace

void register_optim_kernels() { register_kernel<prim::AdamWStep>(DeviceType::cpu, &adamw_kernel); }

}  // namespace kiln::cpu

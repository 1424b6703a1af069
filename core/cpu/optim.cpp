// CPU kernels of the optimiser primitives: the reference AdamW update, element by element in f32 with
// the same operation order and explicit fused multiply-adds as the CUDA kernel (so both round
// identically); the multi-tensor L2 norm (f64 sums in a fixed order) and in-place scale (f32).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu/parallel.h"
#include "core/registry.h"
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

// Calls f(tag) with the element type of an f32/bf16/f16 tensor (infer rejected any other dtype).
template <class F> void visit_optim_float(DType d, const char* op, F&& f) {
  visit_dtype(d, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
      f(tag);
    } else {
      KILN_FAIL(op, "unsupported dtype {}", dtype_name(d));
    }
  });
}

constexpr int64_t kNormBlock = 1 << 14;  // elements per partial sum

void l2_norm_kernel(const prim::MultiTensorL2Norm& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  double total = 0.0;  // summed tensor by tensor, block by block, in order
  for (size_t i = 0; i < in.size(); ++i) {
    const Tensor& t = in[i];
    const int64_t n = t.numel();
    if (n == 0) continue;
    KILN_CHECK(t.is_contiguous(), op.name(), "tensor {} must be contiguous", i);
    std::vector<double> partial(static_cast<size_t>((n + kNormBlock - 1) / kNormBlock), 0.0);  // (blocks)
    visit_optim_float(t.dtype(), op.name(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* x = static_cast<const T*>(t.raw_data());
      parallel_for(static_cast<int64_t>(partial.size()), 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          double acc = 0.0;
          const int64_t end = std::min(n, (blk + 1) * kNormBlock);
          for (int64_t j = blk * kNormBlock; j < end; ++j) {
            const double v = static_cast<double>(static_cast<float>(x[j]));
            acc += v * v;
          }
          partial[static_cast<size_t>(blk)] = acc;
        }
      });
    });
    for (double p : partial) total += p;
  }
  *out[0].data_ptr<float>() = static_cast<float>(std::sqrt(total));
}

void scale_kernel(const prim::MultiTensorScale& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const float s = op.scale();
  for (size_t i = 0; i < out.size(); ++i) {
    const Tensor& t = out[i];
    if (t.numel() == 0) continue;
    KILN_CHECK(t.is_contiguous(), op.name(), "tensor {} must be contiguous", i);
    visit_optim_float(t.dtype(), op.name(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* x = static_cast<T*>(t.raw_data());
      parallel_for(t.numel(), 1 << 15, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) x[j] = convert<T>(static_cast<float>(x[j]) * s);
      });
    });
  }
}

}  // namespace

KILN_REGISTER(cpu_optim_kernels) {
  register_kernel<prim::AdamWStep>(DeviceType::cpu, &adamw_kernel);
  register_kernel<prim::MultiTensorL2Norm>(DeviceType::cpu, &l2_norm_kernel);
  register_kernel<prim::MultiTensorScale>(DeviceType::cpu, &scale_kernel);
}

}  // namespace kiln::cpu

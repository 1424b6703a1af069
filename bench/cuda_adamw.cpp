// Benchmark of the fused multi-tensor AdamW step (one launch for all tensors): the Llama 3 8B LoRA
// r=16 all-linear set (448 f32 tensors, ~42M params) and a flat 1B-param tensor (f32 and bf16), as
// time per step, GB/s of bytes read + written (f32: p,g,m,v read, p,m,v written = 28 B/param) and the
// fraction of the cudaMemcpy device-copy bandwidth measured in the same run; clip_grad_norm_ on the
// LoRA grads against the per-grad-op norm it replaced, and the fused multi-tensor norm / scale alone.
// Usage: cuda_adamw
#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "core/ops/optim.h"
#include "nn/optim.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;
using kiln::bench::time_ms;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};
double g_ref = 0.0;  // cudaMemcpy D2D GB/s

void row(const std::string& name, int64_t tensors, double params, double bytes, double ms) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  if (g_ref == 0.0) g_ref = gbs;
  std::printf("%-46s %8lld %10.1f %10.3f %10.1f %9.1f%%\n", name.c_str(), static_cast<long long>(tensors), params / 1e6,
              ms, gbs, 100.0 * gbs / g_ref);
}

struct Set {
  std::vector<Tensor> p, g, m, v;
  std::vector<int64_t> steps;
  double params = 0;
  void add(const kiln::Shape& s, DType dt) {
    p.push_back(kiln::randn(s, dt, kGPU));
    g.push_back(kiln::mul(kiln::randn(s, dt, kGPU), 1e-3));
    m.push_back(kiln::zeros(s, DType::f32, kGPU));
    v.push_back(kiln::zeros(s, DType::f32, kGPU));
    steps.push_back(1);
    params += static_cast<double>(kiln::numel(s));
  }
};

// Llama 3 8B: 32 layers x (q, k, v, o, gate, up, down) as (in, out); LoRA A (r, in), B (out, r).
Set lora_set(int64_t r) {
  const std::vector<std::pair<int64_t, int64_t>> mods = {{4096, 4096}, {4096, 1024}, {4096, 1024}, {4096, 4096},
                                                         {4096, 14336}, {4096, 14336}, {14336, 4096}};
  Set s;
  for (int layer = 0; layer < 32; ++layer) {
    for (const auto& [in, out] : mods) {
      s.add({r, in}, DType::f32);
      s.add({out, r}, DType::f32);
    }
  }
  return s;
}

}  // namespace

int main() {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  kiln::autograd::NoGradGuard no_grad;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const kiln::AdamWHyper h{1e-4, 0.9, 0.999, 1e-8, 0.01};
  std::printf("fused AdamW on %s; GB/s = (bytes read + written) / time, f32 state\n", prop.name);
  std::printf("%-46s %8s %10s %10s %10s %10s\n", "case", "tensors", "Mparams", "ms/step", "GB/s", "of memcpy");

  {  // reference: a 1 GiB device-to-device copy
    const int64_t n = int64_t(1) << 28;
    Tensor a = kiln::empty({n}, DType::f32, kGPU), b = kiln::empty({n}, DType::f32, kGPU);
    void* st = cuda::current_stream().handle();
    row("cudaMemcpyAsync D2D 1 GiB (reference)", 1, 0, 2.0 * 4 * n, time_ms([&] {
          cudaMemcpyAsync(b.raw_data(), a.raw_data(), 4 * static_cast<size_t>(n), cudaMemcpyDeviceToDevice,
                          static_cast<cudaStream_t>(st));
        }));
  }
  {
    Set s = lora_set(16);
    const int64_t nt = static_cast<int64_t>(s.p.size());
    row("8B LoRA r=16 all-linear, adamw_step_ (1 op)", nt, s.params, 28 * s.params,
        time_ms([&] { kiln::adamw_step_(s.p, s.g, s.m, s.v, s.steps, h); }, 50, 5));
    row("8B LoRA r=16, one adamw_step_ per tensor", nt, s.params, 28 * s.params, time_ms([&] {
          for (size_t i = 0; i < s.p.size(); ++i) kiln::adamw_step_({s.p[i]}, {s.g[i]}, {s.m[i]}, {s.v[i]}, {1}, h);
        }, 20, 3));
    // The optimizer class: grouping, lazy state, host bookkeeping included.
    kiln::nn::NamedTensors named;
    for (size_t i = 0; i < s.p.size(); ++i) {
      Tensor p = s.p[i];
      p.set_grad(s.g[i]);
      named.emplace_back(fmt::format("lora.{}", i), p);
    }
    kiln::nn::AdamW opt(named, {1e-4, 0.9, 0.999, 1e-8, 0.01});
    row("8B LoRA r=16, nn::AdamW::step()", nt, s.params, 28 * s.params, time_ms([&] { opt.step(); }, 50, 5));
    row("8B LoRA r=16, clip_grad_norm_ (1 sync, read g)", nt, s.params, 4 * s.params,
        time_ms([&] { kiln::nn::clip_grad_norm_(named, 1e9); }, 20, 3));
    row("8B LoRA r=16, clip norm by per-grad ops (old)", nt, s.params, 4 * s.params, time_ms([&] {
          std::vector<Tensor> parts;  // (448) 0-d sums of squares
          for (const Tensor& g : s.g) parts.push_back(kiln::sum(kiln::square(kiln::cast(g, DType::f32))));
          (void)kiln::sum(kiln::stack(parts, 0)).item<double>();
        }, 20, 3));
    row("8B LoRA r=16, multi_tensor_l2_norm (no sync)", nt, s.params, 4 * s.params,
        time_ms([&] { (void)kiln::multi_tensor_l2_norm(s.g); }, 50, 5));
    row("8B LoRA r=16, multi_tensor_scale_ (r+w g)", nt, s.params, 8 * s.params,
        time_ms([&] { kiln::multi_tensor_scale_(s.g, 1.0); }, 50, 5));
    std::vector<Tensor> gb;  // (448) bf16 copies of the grads
    for (const Tensor& g : s.g) gb.push_back(kiln::cast(g, DType::bf16));
    row("8B LoRA r=16 bf16 grads, multi_tensor_l2_norm", nt, s.params, 2 * s.params,
        time_ms([&] { (void)kiln::multi_tensor_l2_norm(gb); }, 50, 5));
  }
  cuda::empty_cache();
  for (DType dt : {DType::f32, DType::bf16}) {
    Set s;
    s.add({1000000000}, dt);
    const double bpp = dt == DType::f32 ? 28.0 : 22.0;  // bf16: p, g 2 B each; m, v f32
    row(fmt::format("1B flat {} params, adamw_step_", kiln::dtype_name(dt)), 1, s.params, bpp * s.params,
        time_ms([&] { kiln::adamw_step_(s.p, s.g, s.m, s.v, s.steps, h); }, 10, 2));
    s = Set();
    cuda::empty_cache();
  }
  cuda::synchronize();
  return 0;
}

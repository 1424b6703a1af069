// Benchmark of scaled dot-product attention on CUDA: causal bf16, B = 1, 32 query / 8 kv heads,
// D = 128, T = S = 4096 and 8192 (q/k/v as permuted (B, T, H, D) views, as projections give them),
// forward and backward TFLOP/s of the cuDNN path and the flash kernel.
// FLOPs: forward 4 * B * Hq * T * S * D, halved for causal; backward 2.5x forward.
// Usage: cuda_attention [T ...]
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "core/cuda/runtime.h"
#include "core/cuda/sdpa_cudnn.h"
#include "core/dispatch.h"
#include "bench/cuda_timing.h"
#include "core/ops.h"
#include "core/ops/attention.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::time_ms;

// (B, H, L, D) bf16 view of a random (B, L, H, D) device buffer.
Tensor permuted_bf16(int64_t b, int64_t h, int64_t l, int64_t d) {
  Tensor x = kiln::cast(kiln::randn({b, l, h, d}, DType::f32, kGPU), DType::bf16);
  return kiln::permute(x, {0, 2, 1, 3});
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  std::vector<int64_t> lengths;
  for (int i = 1; i < argc; ++i) lengths.push_back(std::atoll(argv[i]));
  if (lengths.empty()) lengths = {4096, 8192};
  const int64_t b = 1, hq = 32, hkv = 8, d = 128;
  const bool causal = true;
  const double scale = 0.08838834764831845;  // 1 / sqrt(128)
  std::printf("causal bf16 attention, B %lld, Hq %lld, Hkv %lld, D %lld; TFLOP/s with forward = 4 B Hq T S D / 2, "
              "backward = 2.5 x forward\n",
              static_cast<long long>(b), static_cast<long long>(hq), static_cast<long long>(hkv),
              static_cast<long long>(d));
  std::printf("%-7s %-6s %10s %10s %10s %10s\n", "T=S", "path", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s");
  for (int64_t t : lengths) {
    const Tensor q = permuted_bf16(b, hq, t, d), k = permuted_bf16(b, hkv, t, d), v = permuted_bf16(b, hkv, t, d);
    const Tensor dout = kiln::cast(kiln::randn({b, hq, t, d}, DType::f32, kGPU), DType::bf16);
    const Tensor dlse = kiln::zeros({b, hq, t}, DType::f32, kGPU);
    const double fwd_flops = 4.0 * b * hq * static_cast<double>(t) * static_cast<double>(t) * d / 2.0;
    const double bwd_flops = 2.5 * fwd_flops;
    for (cuda::SdpaBackend backend : {cuda::SdpaBackend::cudnn, cuda::SdpaBackend::flash}) {
      cuda::set_sdpa_backend(backend);
      const auto fwd_op = std::make_shared<const kiln::prim::ScaledDotProductAttention>(causal, scale);
      const auto bwd_op = std::make_shared<const kiln::prim::SdpaBackward>(causal, scale);
      std::vector<Tensor> outs = kiln::dispatch(fwd_op, {q, k, v});
      const int iters = backend == cuda::SdpaBackend::cudnn ? 20 : 3;
      const double fwd_ms = time_ms([&] { outs = kiln::dispatch(fwd_op, {q, k, v}); }, iters);
      const double bwd_ms = time_ms([&] { kiln::dispatch(bwd_op, {q, k, v, outs[0], outs[1], dout, dlse}); }, iters);
      std::printf("%-7lld %-6s %10.3f %10.1f %10.3f %10.1f\n", static_cast<long long>(t), cuda::last_sdpa_path(), fwd_ms,
                  fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_ms, bwd_flops / (bwd_ms * 1e-3) / 1e12);
    }
    cuda::set_sdpa_backend(cuda::SdpaBackend::automatic);
  }
  return 0;
}

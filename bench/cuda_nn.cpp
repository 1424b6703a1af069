// Benchmark of the fused nn kernels on CUDA with tensors of >= 256 MB in bf16: rms_norm, rotary
// embedding, swiglu and cross-entropy over Llama-vocab rows, forward and backward (the backward
// primitives called directly), as GB/s of the bytes each must read and write once and the fraction
// of cudaMemcpy device-to-device bandwidth measured first in the same run (target >= 80%).
// Usage: cuda_nn [iterations]
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>

#include "autograd/grad_mode.h"
#include "core/cuda/runtime.h"
#include "core/dispatch.h"
#include "bench/cuda_timing.h"
#include "core/ops.h"
#include "core/ops/activation.h"
#include "core/ops/loss.h"
#include "core/ops/norm.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};
int g_iters = 20;

double time_ms(const std::function<void()>& fn) { return kiln::bench::time_ms(fn, g_iters); }

double g_copy = 0.0;  // cudaMemcpy D2D GB/s, the reference

void row(const std::string& name, double bytes, double ms) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  if (g_copy == 0.0) g_copy = gbs;
  std::printf("%-52s %10.1f %9.3f %9.1f %8.1f%%\n", name.c_str(), bytes / 1e6, ms, gbs, 100.0 * gbs / g_copy);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  kiln::autograd::NoGradGuard no_grad;
  g_iters = argc > 1 ? std::atoi(argv[1]) : 20;
  std::printf("%-52s %10s %9s %9s %9s\n", "op (bf16)", "MB moved", "ms", "GB/s", "of copy");
  const double b2 = 2.0;  // bytes per bf16

  {  // reference: cudaMemcpyAsync device to device of 1 GiB, bytes read + written
    const int64_t bytes = int64_t{1} << 30;
    Tensor a = kiln::empty({bytes}, DType::u8, kGPU), b = kiln::empty({bytes}, DType::u8, kGPU);
    auto s = static_cast<cudaStream_t>(cuda::current_stream().handle());
    row("cudaMemcpy D2D (1 GiB)", 2.0 * static_cast<double>(bytes), time_ms([&] {
          cudaMemcpyAsync(b.raw_data(), a.raw_data(), static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, s);
        }));
  }

  {  // rms_norm over (32768, 4096): 256 MiB per tensor
    const int64_t r = 32768, d = 4096;
    const double n = static_cast<double>(r * d);
    Tensor x = kiln::randn({r, d}, DType::bf16, kGPU), w = kiln::randn({d}, DType::bf16, kGPU);
    Tensor g = kiln::randn({r, d}, DType::bf16, kGPU);
    Tensor y;
    row("rms_norm fwd (32768, 4096)", 2 * n * b2, time_ms([&] { y = kiln::rms_norm(x, w, 1e-5); }));
    auto bwd = std::make_shared<const kiln::prim::RmsNormBackward>(1e-5);
    std::vector<Tensor> grads;
    row("rms_norm bwd (x, g -> dx, dw)", 3 * n * b2, time_ms([&] { grads = kiln::dispatch(bwd, {x, w, g}); }));
  }

  {  // rotary over (8, 32, 4096, 128): 256 MiB; f32 tables (4096, 64)
    const int64_t b = 8, h = 32, t = 4096, d = 128;
    const double n = static_cast<double>(b * h * t * d);
    Tensor x = kiln::randn({b, h, t, d}, DType::bf16, kGPU);
    Tensor cos = kiln::randn({t, d / 2}, DType::f32, kGPU), sin = kiln::randn({t, d / 2}, DType::f32, kGPU);
    Tensor nsin = kiln::neg(sin);
    const double tables = 2.0 * static_cast<double>(t * d / 2) * 4.0;
    Tensor y;
    row("rope fwd (8, 32, 4096, 128), f32 tables", 2 * n * b2 + tables, time_ms([&] { y = kiln::rotary_embedding(x, cos, sin); }));
    // the backward pass is the same kernel with -sin
    row("rope bwd", 2 * n * b2 + tables, time_ms([&] { y = kiln::rotary_embedding(x, cos, nsin); }));
    Tensor xt = kiln::permute(kiln::randn({b, t, h, d}, DType::bf16, kGPU), {0, 2, 1, 3});
    row("rope fwd on a (B, T, H, D) -> (B, H, T, D) view", 2 * n * b2 + tables,
        time_ms([&] { y = kiln::rotary_embedding(xt, cos, sin); }));
  }

  {  // swiglu over (16384, 14336): 448 MiB per tensor
    const int64_t r = 16384, c = 14336;
    const double n = static_cast<double>(r * c);
    Tensor gate = kiln::randn({r, c}, DType::bf16, kGPU), up = kiln::randn({r, c}, DType::bf16, kGPU);
    Tensor g = kiln::randn({r, c}, DType::bf16, kGPU);
    Tensor y;
    row("swiglu fwd (16384, 14336)", 3 * n * b2, time_ms([&] { y = kiln::swiglu(gate, up); }));
    auto bwd = std::make_shared<const kiln::prim::SwiGluBackward>();
    std::vector<Tensor> grads;
    row("swiglu bwd (gate, up, g -> dgate, dup)", 5 * n * b2, time_ms([&] { grads = kiln::dispatch(bwd, {gate, up, g}); }));
  }

  {  // cross-entropy over (4096, 128256): 1 GiB of logits
    const int64_t r = 4096, v = 128256;
    const double n = static_cast<double>(r * v);
    Tensor logits = kiln::randn({r, v}, DType::bf16, kGPU);
    Tensor targets = kiln::randint(0, v, {r}, DType::i64, kGPU);
    Tensor y;
    row("cross_entropy fwd (4096, 128256), mean", n * b2, time_ms([&] { y = kiln::cross_entropy(logits, targets); }));
    auto bwd = std::make_shared<const kiln::prim::CrossEntropyBackward>(-100, kiln::Reduction::mean);
    Tensor one = kiln::ones({}, DType::bf16, kGPU);
    row("cross_entropy bwd (logits -> dlogits)", 2 * n * b2, time_ms([&] { y = kiln::dispatch1(bwd, {logits, targets, one}); }));
  }
  std::printf("(MB moved: each input read once and each output written once; the index-checking ops\n"
              " embedding and cross_entropy also wait for the stream once per call)\n");
  return 0;
}

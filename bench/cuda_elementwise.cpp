// Benchmark of the CUDA elementwise and reduction kernels on tensors of >= 256 MB: cudaMemcpy
// device-to-device first (the reference bandwidth), then kiln add/mul/silu, a broadcast bias add,
// softmax over Llama-vocab rows (N, 128256) and sums, as GB/s of bytes read + written and the
// fraction of the copy figure measured in the same run. Timed with CUDA events after warm-up.
// Usage: cuda_elementwise [MiB per tensor]
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "autograd/grad_mode.h"
#include "core/cuda/runtime.h"
#include "bench/cuda_timing.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::time_ms;

double g_copy = 0.0;  // cudaMemcpy D2D GB/s, the reference

void row(const std::string& name, double bytes, double ms) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  if (g_copy == 0.0) g_copy = gbs;
  std::printf("%-46s %10.1f %10.3f %10.1f %8.1f%%\n", name.c_str(), bytes / 1e6, ms, gbs, 100.0 * gbs / g_copy);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  kiln::autograd::NoGradGuard no_grad;
  const int64_t bytes = (argc > 1 ? std::atoll(argv[1]) : 256) * (int64_t{1} << 20);  // per tensor
  std::printf("%-46s %10s %10s %10s %9s\n", "op", "MB moved", "ms", "GB/s", "of copy");

  {  // reference: cudaMemcpyAsync device to device, bytes read + written
    Tensor a = kiln::empty({bytes}, DType::u8, kGPU), b = kiln::empty({bytes}, DType::u8, kGPU);
    auto s = static_cast<cudaStream_t>(cuda::current_stream().handle());
    const double ms = time_ms([&] { cudaMemcpyAsync(b.raw_data(), a.raw_data(), static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, s); });
    row("cudaMemcpy D2D", 2.0 * static_cast<double>(bytes), ms);
  }

  for (DType d : {DType::bf16, DType::f32}) {
    const std::string dn = kiln::dtype_name(d);
    const int64_t n = bytes / static_cast<int64_t>(kiln::itemsize(d));
    const double sz = static_cast<double>(kiln::itemsize(d));
    Tensor x = kiln::randn({n}, d, kGPU), y = kiln::randn({n}, d, kGPU);
    Tensor out;
    row("add " + dn + " (" + std::to_string(n) + ")", 3.0 * n * sz, time_ms([&] { out = kiln::add(x, y); }));
    row("mul " + dn, 3.0 * n * sz, time_ms([&] { out = kiln::mul(x, y); }));
    row("mul by 0-d scalar " + dn, 2.0 * n * sz, time_ms([&] { out = kiln::mul(x, 0.5); }));
    row("silu " + dn, 2.0 * n * sz, time_ms([&] { out = kiln::silu(x); }));
    const int64_t c = 4096;
    Tensor x2 = x.view({n / c, c}), bias = kiln::randn({c}, d, kGPU);
    row("add bias (N, 4096) + (4096) " + dn, 2.0 * n * sz + c * sz, time_ms([&] { out = kiln::add(x2, bias); }));
    row("sum last dim (N, 4096) " + dn, n * sz, time_ms([&] { out = kiln::sum(x2, {1}); }));
    row("sum dim 0 (N, 4096) " + dn, n * sz, time_ms([&] { out = kiln::sum(x2, {0}); }));
    row("sum all " + dn, n * sz, time_ms([&] { out = kiln::sum(x); }));
    const int64_t vocab = 128256;
    const int64_t rows = (bytes + vocab * static_cast<int64_t>(sz) - 1) / (vocab * static_cast<int64_t>(sz));
    Tensor logits = kiln::randn({rows, vocab}, d, kGPU);
    const double sm_bytes = 2.0 * static_cast<double>(rows * vocab) * sz;
    row("softmax (" + std::to_string(rows) + ", 128256) " + dn, sm_bytes, time_ms([&] { out = kiln::softmax(logits, -1); }));
    row("log_softmax (" + std::to_string(rows) + ", 128256) " + dn, sm_bytes,
        time_ms([&] { out = kiln::log_softmax(logits, -1); }));
    row("logsumexp (" + std::to_string(rows) + ", 128256) " + dn, sm_bytes / 2,
        time_ms([&] { out = kiln::logsumexp(logits, {1}); }));
  }
  cuda::synchronize();
  return 0;
}

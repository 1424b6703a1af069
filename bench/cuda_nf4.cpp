// Benchmark of NF4 on the GPU: one-kernel dequantisation vs the device-copy bandwidth and vs the
// three-step path of bitsandbytes/Unsloth (8-bit absmax -> f32 buffer, + offset, NF4 with f32
// scales), quantising every linear layer of Llama 3.1 8B, and NF4 linear fwd+bwd vs bf16 linear.
// Usage: cuda_nf4 [--dequant-only]   (--dequant-only: the dequantisation table alone)
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "quant/nf4.h"

namespace {

using kiln::DType;
using kiln::Shape;
using kiln::Tensor;
using kiln::bench::time_ms;
namespace cuda = kiln::cuda;
namespace quant = kiln::quant;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

struct Linear {
  const char* name;
  int64_t n, k;  // weight (N, K)
};

// Device-to-device memcpy moving `bytes` (read + write) in GB/s.
double copy_gbs(size_t bytes) {
  Tensor a = kiln::empty({static_cast<int64_t>(bytes / 2)}, DType::u8, kGPU);
  Tensor b = kiln::empty({static_cast<int64_t>(bytes / 2)}, DType::u8, kGPU);
  auto stream = static_cast<cudaStream_t>(cuda::current_stream().handle());
  const double ms =
      time_ms([&] { cudaMemcpyAsync(b.raw_data(), a.raw_data(), bytes / 2, cudaMemcpyDeviceToDevice, stream); }, 50, 5);
  return static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

// cudaMemsetAsync writing `bytes` (a write-only pass, nothing read), in ms.
double memset_ms(size_t bytes) {
  Tensor a = kiln::empty({static_cast<int64_t>(bytes)}, DType::u8, kGPU);
  auto stream = static_cast<cudaStream_t>(cuda::current_stream().handle());
  return time_ms([&] { cudaMemsetAsync(a.raw_data(), 1, bytes, stream); }, 50, 5);
}

void dequant_table() {
  std::printf("\n## NF4 dequantise to bf16 (double quant, blocks of 64)\n");
  std::printf("%-16s %9s %9s %9s %9s %8s %10s %9s %10s %9s\n", "weight (N, K)", "MB moved", "kiln ms", "GB/s", "copy GB/s",
              "of copy", "3-step ms", "speedup", "memset ms", "call us");
  const std::vector<Linear> shapes = {{"", 1024, 4096},  {"", 4096, 4096}, {"", 4096, 14336},  // k and v; q and o; down
                                      {"", 14336, 4096}, {"", 128256, 4096}};              // gate and up; the head
  for (const Linear& l : shapes) {
    const int64_t n = l.n * l.k;
    quant::NF4Weight q = quant::quantize_nf4(kiln::randn({l.n, l.k}, DType::bf16, kGPU), true);
    const size_t moved = q.nbytes() + static_cast<size_t>(n) * 2;  // scales + packed read, bf16 written
    const double ms = time_ms([&] { quant::dequantize_nf4(q, DType::bf16); }, 50, 5);
    const double gbs = static_cast<double>(moved) / (ms * 1e-3) / 1e9;
    const double ref = copy_gbs(moved);
    // bitsandbytes' path: absmax to an f32 buffer, add the offset, then NF4 with f32 scales
    quant::NF4Weight single = q;
    single.double_quant = false;
    single.nested_absmax = Tensor();
    single.nested_code = Tensor();
    const double ms3 = time_ms(
        [&] {
          Tensor s = quant::dequantize_blockwise_8bit(q.absmax, q.nested_absmax, q.nested_code, q.nested_blocksize);
          single.absmax = kiln::add(s, static_cast<double>(q.offset));
          quant::dequantize_nf4(single, DType::bf16);
        },
        50, 5);
    const double ms_w = memset_ms(static_cast<size_t>(n) * 2);
    const double call_us = kiln::bench::median_call_us([&] { quant::dequantize_nf4(q, DType::bf16); });
    std::printf("%-16s %9.1f %9.4f %9.0f %9.0f %7.1f%% %10.4f %8.2fx %10.4f %9.2f\n",
                (std::to_string(l.n) + "x" + std::to_string(l.k)).c_str(), static_cast<double>(moved) / 1e6, ms, gbs,
                ref, 100.0 * gbs / ref, ms3, ms3 / ms, ms_w, call_us);
  }
  std::printf("(bytes per weight: 0.5 packed + 2 bf16 out + scales = %.4f; memset: writing the bf16 output alone; call us:\n"
              " the median of 200 single calls, each waited for, launch included, as the anchors time Unsloth's)\n",
              0.5 + 2.0 + 1.0 / 64 + 4.0 / (64.0 * 256));
}

void quantize_8b() {
  std::printf("\n## Quantise every linear layer of Llama 3.1 8B on the GPU (random bf16, 32 layers)\n");
  const std::vector<Linear> layer = {{"q", 4096, 4096},     {"k", 1024, 4096},     {"v", 1024, 4096},
                                     {"o", 4096, 4096},     {"gate", 14336, 4096}, {"up", 14336, 4096},
                                     {"down", 4096, 14336}};
  std::vector<Tensor> buffers;
  for (const Linear& l : layer) buffers.push_back(kiln::randn({l.n, l.k}, DType::bf16, kGPU));
  quant::quantize_nf4(buffers[0], true);  // warm-up
  cuda::synchronize();
  int64_t weights = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int layer_i = 0; layer_i < 32; ++layer_i) {
    for (size_t j = 0; j < layer.size(); ++j) {
      const quant::NF4Weight q = quant::quantize_nf4(buffers[j], true);
      (void)q;
      weights += buffers[j].numel();
    }
  }
  cuda::synchronize();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%lld weights (%zu tensors) in %.3f s = %.1f Gweights/s, %.0f GB/s of bf16 read\n",
              static_cast<long long>(weights), 32 * layer.size(), s, static_cast<double>(weights) / s / 1e9,
              static_cast<double>(weights) * 2.0 / s / 1e9);
}

void linear_table() {
  std::printf("\n## Linear fwd+bwd (input gradient only, frozen weight), tokens 4096, bf16\n");
  std::printf("%-6s %-14s %11s %11s %8s\n", "layer", "weight (N, K)", "bf16 ms", "nf4 ms", "nf4/bf16");
  const std::vector<Linear> layer = {{"q", 4096, 4096},     {"k", 1024, 4096},     {"o", 4096, 4096},
                                     {"gate", 14336, 4096}, {"down", 4096, 14336}};
  const int64_t tokens = 4096;
  double total_bf16 = 0, total_nf4 = 0;
  for (const Linear& l : layer) {
    Tensor w = kiln::mul(kiln::randn({l.n, l.k}, DType::bf16, kGPU), 0.02);
    quant::NF4Weight q = quant::quantize_nf4(w, true);
    Tensor x = kiln::randn({tokens, l.k}, DType::bf16, kGPU).set_requires_grad();
    Tensor g = kiln::randn({tokens, l.n}, DType::bf16, kGPU);
    const double ms_bf16 = time_ms(
        [&] {
          x.zero_grad();
          kiln::matmul(x, w.t()).backward(g);
        },
        20, 3);
    const double ms_nf4 = time_ms(
        [&] {
          x.zero_grad();
          quant::nf4_linear(x, q).backward(g);
        },
        20, 3);
    total_bf16 += ms_bf16;
    total_nf4 += ms_nf4;
    std::printf("%-6s %-14s %11.3f %11.3f %7.1f%%\n", l.name, (std::to_string(l.n) + "x" + std::to_string(l.k)).c_str(),
                ms_bf16, ms_nf4, 100.0 * ms_nf4 / ms_bf16);
  }
  std::printf("%-6s %-14s %11.3f %11.3f %7.1f%%\n", "all", "", total_bf16, total_nf4, 100.0 * total_nf4 / total_bf16);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  dequant_table();
  if (argc > 1 && std::string(argv[1]) == "--dequant-only") return 0;
  quantize_8b();
  linear_table();
  return 0;
}

// Benchmark of device copies on >= 256 MB: cudaMemcpy device-to-device (the reference bandwidth),
// kiln's contiguous copy (memcpy path and its own vectorised kernel), casts, strided (transposed)
// copies, fill and the Philox fills, as GB/s of bytes read + written and the fraction of the
// cudaMemcpy figure measured in the same run.
// Usage: cuda_copy [MiB]
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "core/cuda/copy.cuh"
#include "core/cuda/runtime.h"
#include "bench/cuda_timing.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::time_ms;

double g_ref = 0.0;  // cudaMemcpy GB/s

void row(const std::string& name, double bytes, double ms) {
  double gbs = bytes / (ms * 1e-3) / 1e9;
  if (g_ref == 0.0) g_ref = gbs;
  std::printf("%-44s %10.1f %10.3f %10.1f %9.1f%%\n", name.c_str(), bytes / 1e6, ms, gbs, 100.0 * gbs / g_ref);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  const int64_t mib = argc > 1 ? std::atoll(argv[1]) : 256;
  const int64_t n = mib * (1 << 20) / 4;  // f32 elements
  const int64_t side = 8192;              // square transposes of side^2 f32 = 256 MB
  Tensor src = kiln::rand({n}, DType::f32, kGPU);
  Tensor dst = kiln::empty({n}, DType::f32, kGPU);
  Tensor dst_bf16 = kiln::empty({n}, DType::bf16, kGPU);
  Tensor src_bf16 = kiln::cast(src, DType::bf16);
  Tensor dst_f16 = kiln::empty({n}, DType::f16, kGPU);
  Tensor sq = kiln::rand({side, side}, DType::f32, kGPU);
  Tensor sq_dst = kiln::empty({side, side}, DType::f32, kGPU);
  Tensor sq_bf16 = kiln::empty({side, side}, DType::bf16, kGPU);
  const double f32b = static_cast<double>(n) * 4, bf16b = static_cast<double>(n) * 2;
  const double sqb = static_cast<double>(side * side) * 4;
  void* stream = cuda::current_stream().handle();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device copies on %s, %lld MiB of f32 (%lld elements); GB/s = (bytes read + written) / time\n", prop.name,
              static_cast<long long>(mib), static_cast<long long>(n));
  std::printf("%-44s %10s %10s %10s %10s\n", "copy", "MB moved", "ms", "GB/s", "of memcpy");

  row("cudaMemcpyAsync D2D (reference)", 2 * f32b, time_ms([&] {
        cudaMemcpyAsync(dst.raw_data(), src.raw_data(), static_cast<size_t>(f32b), cudaMemcpyDeviceToDevice,
                        static_cast<cudaStream_t>(stream));
      }));
  row("kiln copy_ f32 contiguous (memcpy path)", 2 * f32b, time_ms([&] { dst.copy_(src); }));
  row("kiln copy kernel f32 -> f32 (16-byte vectors)", 2 * f32b, time_ms([&] {
        if (cuda::launch_copy_contiguous(dst.raw_data(), DType::f32, src.raw_data(), DType::f32, n, stream) != cudaSuccess)
          std::abort();
      }));
  row("kiln cast f32 -> bf16", f32b + bf16b, time_ms([&] { dst_bf16.copy_(src); }));
  row("kiln cast bf16 -> f32", f32b + bf16b, time_ms([&] { dst.copy_(src_bf16); }));
  row("kiln cast f32 -> f16", f32b + bf16b, time_ms([&] { dst_f16.copy_(src); }));
  row("kiln strided f32 (8192^2 transpose)", 2 * sqb, time_ms([&] { sq_dst.copy_(sq.t()); }));
  row("kiln strided cast f32 -> bf16 (transpose)", sqb + sqb / 2, time_ms([&] { sq_bf16.copy_(sq.t()); }));
  row("kiln strided f32 (every other column)", sqb, time_ms([&] {
        sq_dst.slice(1, 0, side, 2).copy_(sq.slice(1, 1, side, 2));
      }));
  row("kiln broadcast row -> matrix f32", sqb, time_ms([&] { sq_dst.copy_(sq.select(0, 3)); }));
  row("kiln fill_ f32 (write only)", f32b, time_ms([&] { dst.fill_(1.5); }));
  row("kiln rand f32 (Philox, write only)", f32b, time_ms([&] { kiln::rand({n}, DType::f32, kGPU); }));
  row("kiln dropout f32 p=0.1 (read + write)", 2 * f32b, time_ms([&] { kiln::dropout(src, 0.1); }));
  cuda::synchronize();
  return 0;
}

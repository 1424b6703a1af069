// Benchmark of all_gather and reduce_scatter over 1 MiB to 1 GiB for the backend dist::init picks (NCCL
// on GPUs when started by kiln launch/torchrun): mean time per call (CUDA events on the caller's stream,
// each call followed by Work::wait), algbw = bytes / time and busbw = algbw * (n - 1) / n, as
// nccl-tests reports them. "bytes" is the gathered output / the reduce-scattered input. Rank 0 prints.
// Usage: kiln launch --nproc N -- dist_collectives [--backend auto|nccl|local|gloo] [--max-mib 1024] [--dtype bf16|f32]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "dist/init.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace dist = kiln::dist;

const char* arg(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  if (!kiln::cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  dist::InitOptions o;
  o.backend = arg(argc, argv, "--backend", "auto");
  const int64_t max_mib = std::atoll(arg(argc, argv, "--max-mib", "1024"));
  const DType dtype = kiln::parse_dtype(arg(argc, argv, "--dtype", "bf16"));
  dist::World w = dist::init(o);
  dist::ProcessGroup& pg = *w.group;
  const int n = pg.size();
  const double bus = n > 1 ? static_cast<double>(n - 1) / n : 0.0;
  if (pg.rank() == 0) {
    std::printf("dist collectives: backend %s, %d ranks, %s, device %s\n", pg.backend().c_str(), n,
                kiln::dtype_name(dtype), w.device.str().c_str());
    std::printf("%-15s %10s %12s %12s %12s\n", "collective", "MiB", "time (us)", "algbw GB/s", "busbw GB/s");
  }
  for (const char* name : {"all_gather", "reduce_scatter"}) {
    const bool gather = std::strcmp(name, "all_gather") == 0;
    for (int64_t mib = 1; mib <= max_mib; mib *= 2) {
      // elements of the full tensor, a multiple of n
      const int64_t total = (mib << 20) / static_cast<int64_t>(kiln::itemsize(dtype)) / n * n;
      Tensor full_tensor = kiln::zeros({total}, dtype, w.device);
      Tensor shard = kiln::zeros({total / n}, dtype, w.device);
      const int iters = mib <= 64 ? 20 : mib <= 256 ? 10 : 5;
      pg.barrier().wait();
      const double ms = kiln::bench::time_ms(
          [&] {
            if (gather) pg.all_gather(full_tensor, shard).wait();
            else pg.reduce_scatter(shard, full_tensor).wait();
          },
          iters);
      const double bytes = static_cast<double>(total) * static_cast<double>(kiln::itemsize(dtype));
      const double algbw = bytes / (ms * 1e-3) / 1e9;
      if (pg.rank() == 0)
        std::printf("%-15s %10lld %12.1f %12.1f %12.1f\n", name, static_cast<long long>(mib), ms * 1e3, algbw, algbw * bus);
    }
  }
  pg.barrier().wait();
  return 0;
}

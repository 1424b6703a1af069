// Benchmark of the CUDA caching allocator: a training-like loop (a forward that keeps activations,
// a backward that frees them while making gradients, a side stream that reads some of them under
// record_stream) printing cudaMalloc calls per step (target: 0 after step 1), then the host latency
// of one allocate+free pair against raw cudaMalloc/cudaFree.
// Usage: cuda_alloc [steps]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/cuda/runtime.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Shape;
using kiln::Tensor;
namespace cuda = kiln::cuda;
using clock_type = std::chrono::steady_clock;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

// One transformer block's activations for B=4, T=1024, C=2048 (bf16) plus fp32 norms and stats.
std::vector<std::pair<Shape, DType>> block_activations() {
  const int64_t B = 4, T = 1024, C = 2048, H = 16, F = 5632;
  return {{{B, T, C}, DType::bf16},    {{B, T}, DType::f32},        {{B, T, 3 * C}, DType::bf16},
          {{B, H, T, C / H}, DType::bf16}, {{B, H, T}, DType::f32},  {{B, T, C}, DType::bf16},
          {{B, T, C}, DType::bf16},    {{B, T}, DType::f32},        {{B, T, 2 * F}, DType::bf16},
          {{B, T, F}, DType::bf16},    {{B, T, C}, DType::bf16},    {{1000 + 13}, DType::f32}};
}

double mib(size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); }

void training_loop(int steps) {
  const int layers = 8;
  cuda::Stream side = cuda::Stream::create();
  cuda::Stream comm = cuda::Stream::create(-1, /*high_priority=*/true);
  const auto acts = block_activations();
  std::printf("training-like loop: %d layers x %zu activations (B=4, T=1024, C=2048), 3 streams\n", layers, acts.size());
  std::printf("%6s %14s %12s %14s %14s %10s\n", "step", "cudaMallocs", "allocs", "reserved MiB", "peak MiB", "ms");
  for (int step = 0; step < steps; ++step) {
    const cuda::MemoryStats before = cuda::memory_stats();
    cuda::reset_peak_memory_stats();
    auto t0 = clock_type::now();
    {
      std::vector<std::vector<Tensor>> saved(layers);
      for (int l = 0; l < layers; ++l) {  // forward: keep every activation
        for (const auto& [shape, dt] : acts) saved[static_cast<size_t>(l)].push_back(kiln::empty(shape, dt, kGPU));
        // the side stream reads this layer's input (an all-gather/offload stand-in)
        Tensor& x = saved[static_cast<size_t>(l)][0];
        cuda::record_stream(x.storage(), side);
        cuda::StreamGuard g(side);
        Tensor tmp = kiln::empty({4, 1024, 2048}, DType::bf16, kGPU);  // side-stream scratch
      }
      for (int l = layers - 1; l >= 0; --l) {  // backward: gradients appear as activations die
        std::vector<Tensor> grads;
        for (size_t i = 0; i < acts.size(); i += 2) grads.push_back(kiln::empty(acts[i].first, acts[i].second, kGPU));
        saved[static_cast<size_t>(l)].clear();
        cuda::StreamGuard g(comm);  // reduce-scatter buffer on the communication stream
        Tensor bucket = kiln::empty({25 << 20}, DType::bf16, kGPU);
      }
    }
    cuda::synchronize();
    double ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
    const cuda::MemoryStats after = cuda::memory_stats();
    std::printf("%6d %14llu %12llu %14.1f %14.1f %10.3f\n", step,
                static_cast<unsigned long long>(after.num_cuda_mallocs - before.num_cuda_mallocs),
                static_cast<unsigned long long>(after.num_allocs - before.num_allocs), mib(after.reserved),
                mib(after.peak_allocated), ms);
  }
}

// Mean host time of one allocate+free pair, in microseconds.
template <class Alloc, class Free>
double pair_us(int iters, Alloc&& alloc, Free&& free_fn) {
  for (int i = 0; i < 10; ++i) free_fn(alloc());
  auto t0 = clock_type::now();
  for (int i = 0; i < iters; ++i) free_fn(alloc());
  return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count() / iters;
}

void latency() {
  std::printf("\nallocate+free latency (host, mean over the loop)\n");
  std::printf("%12s %18s %18s %18s\n", "size", "caching us", "kiln::empty us", "cudaMalloc+Free us");
  kiln::Allocator* a = cuda::caching_allocator();
  for (size_t bytes : {size_t{4096}, size_t{1} << 20, size_t{64} << 20, size_t{512} << 20}) {
    double cached = pair_us(
        20000, [&] { return a->allocate(bytes, kGPU); }, [&](void* p) { a->deallocate(p, bytes, kGPU); });
    double tensor = pair_us(
        20000, [&] { return kiln::empty({static_cast<int64_t>(bytes)}, DType::u8, kGPU); }, [](Tensor) {});
    double raw = pair_us(
        bytes >= (size_t{64} << 20) ? 50 : 500,
        [&] {
          void* p = nullptr;
          if (cudaMalloc(&p, bytes) != cudaSuccess) std::abort();
          return p;
        },
        [](void* p) { cudaFree(p); });
    std::string label = bytes >= (size_t{1} << 20) ? std::to_string(bytes >> 20) + " MiB" : std::to_string(bytes) + " B";
    std::printf("%12s %18.3f %18.3f %18.3f\n", label.c_str(), cached, tensor, raw);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  const int steps = argc > 1 ? std::atoi(argv[1]) : 6;
  training_loop(steps);
  latency();
  const cuda::MemoryStats s = cuda::memory_stats();
  std::printf("\ntotals: %llu cudaMalloc, %llu cudaFree, %llu allocations served, peak reserved %.1f MiB\n",
              static_cast<unsigned long long>(s.num_cuda_mallocs), static_cast<unsigned long long>(s.num_cuda_frees),
              static_cast<unsigned long long>(s.num_allocs), mib(s.peak_reserved));
  return 0;
}

// Benchmark of compile/ on one Llama 3.1 8B decoder layer (hidden 4096, 32 heads, 8 KV heads, MLP
// 14336) in bf16 on CUDA at T tokens (default 4096): eager against compiled, forward and forward +
// backward, as milliseconds per call, the part spent in GEMMs and attention (timed op by op with CUDA
// events by a dispatch handler) and the rest ("outside": norms, residuals, activations, copies —
// what fusion targets), host milliseconds per call, and kernels per layer.
// Usage: compile_block [T] [iterations]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "compile/compile.h"
#include "core/cuda/runtime.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "nn/llama.h"

namespace {

using kiln::Tensor;
namespace cuda = kiln::cuda;
const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

bool heavy(const char* name) {
  const std::string n = name;
  return n == "matmul" || n == "scaled_dot_product_attention" || n == "sdpa_backward";
}

// Times every GEMM and attention op with CUDA events around it and counts the kernels that pass
// through dispatch (fused groups of a compiled plan do not; compile::stats() counts those).
struct OpTimer : kiln::DispatchHandler {
  struct Span {
    std::unique_ptr<cuda::Event> start, stop;
  };
  std::vector<Span> spans;
  int kernels = 0;
  std::vector<Tensor> run(const kiln::PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (op->is_view()) return kiln::dispatch_next(op, inputs);
    ++kernels;
    if (!heavy(op->name())) return kiln::dispatch_next(op, inputs);
    Span s{std::make_unique<cuda::Event>(true), std::make_unique<cuda::Event>(true)};
    s.start->record();
    std::vector<Tensor> out = kiln::dispatch_next(op, inputs);
    s.stop->record();
    spans.push_back(std::move(s));
    return out;
  }
  void run_into(const kiln::PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    ++kernels;
    kiln::dispatch_next_into(op, inputs, outputs);
  }
  double heavy_ms() {
    double ms = 0;
    for (Span& s : spans) {
      s.stop->synchronize();
      ms += s.start->elapsed_ms(*s.stop);
    }
    return ms;
  }
};

struct Row {
  double ms, heavy_ms, host_ms;
  int kernels;
};

// Mean per call over `iters` calls: GPU time (events on the stream), the GEMM/attention part of one
// instrumented call, host time per call.
Row measure(const std::function<void()>& step, int iters, const std::function<int()>& fused_kernels) {
  const double ms = kiln::bench::time_ms(step, iters);
  cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) step();
  const auto t1 = std::chrono::steady_clock::now();
  cuda::synchronize();
  OpTimer timer;
  {
    kiln::HandlerScope scope(&timer);
    step();
  }
  Row r;
  r.ms = ms;
  r.heavy_ms = timer.heavy_ms();
  r.host_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
  r.kernels = timer.kernels + fused_kernels();
  return r;
}

void print(const char* name, const Row& r) {
  std::printf("%-34s %9.3f %11.3f %11.3f %9.3f %8d\n", name, r.ms, r.heavy_ms, r.ms - r.heavy_ms, r.host_ms, r.kernels);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  const int64_t t = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 10;
  kiln::nn::LlamaConfig c = kiln::nn::LlamaConfig::named("llama3.1-8b");
  c.num_hidden_layers = 1;
  c.vocab_size = 128;  // the block is what is measured; a small embedding keeps memory for activations
  kiln::nn::LlamaOptions o;
  o.dtype = kiln::DType::bf16;
  o.device = kGPU;
  o.seed = 1;
  kiln::nn::Llama model(c, o);
  auto& layer = model.model().child_as<kiln::nn::ModuleList>("layers").at<kiln::nn::LlamaDecoderLayer>(0);
  const Tensor x = kiln::randn({1, t, c.hidden_size}, kiln::DType::bf16, kGPU);
  const Tensor xg = x.detach().set_requires_grad(true);
  const Tensor g = kiln::randn({1, t, c.hidden_size}, kiln::DType::bf16, kGPU);
  auto forward = [&] {
    kiln::autograd::NoGradGuard ng;
    (void)layer(x);
  };
  auto train = [&] {
    Tensor y = layer(xg);
    y.backward(g);
  };
  const auto none = [] { return 0; };
  std::printf("Llama 3.1 8B decoder layer, bf16, B=1, T=%lld, %d iterations\n", static_cast<long long>(t), iters);
  std::printf("%-34s %9s %11s %11s %9s %8s\n", "", "GPU ms", "GEMM+attn", "outside", "host ms", "kernels");
  const Row ef = measure(forward, iters, none);
  print("eager forward", ef);
  const Row et = measure(train, iters, none);
  print("eager forward+backward", et);

  kiln::compile::CompileOptions co;
  co.dynamic_dims = {{0, 1}};
  co.name = "decoder layer";
  kiln::HookHandle h = kiln::compile::compile_module(layer, co);
  kiln::compile::reset_stats();
  const Row cf = measure(forward, iters, [] { return static_cast<int>(kiln::compile::stats().last_forward_groups); });
  print("compiled forward", cf);
  const Row ct = measure(train, iters, [] {
    const kiln::compile::Stats s = kiln::compile::stats();
    return static_cast<int>(s.last_forward_groups + s.last_backward_groups);
  });
  print("compiled forward+backward", ct);
  const kiln::compile::Stats s = kiln::compile::stats();
  std::printf("\ncompiled: %lld plans built, %lld NVRTC compilations, %lld kernels from the disk cache, %lld fallback ops\n",
              static_cast<long long>(s.compilations), static_cast<long long>(s.kernel_compiles),
              static_cast<long long>(s.kernel_disk_hits), static_cast<long long>(s.fallback_ops));
  std::printf("per layer: forward %lld kernels (%lld fused groups), backward %lld kernels (%lld fused groups)\n",
              static_cast<long long>(s.last_forward_kernels), static_cast<long long>(s.last_forward_groups),
              static_cast<long long>(s.last_backward_kernels), static_cast<long long>(s.last_backward_groups));
  std::printf("outside GEMM+attention: forward %.3f -> %.3f ms, forward+backward %.3f -> %.3f ms\n", ef.ms - ef.heavy_ms,
              cf.ms - cf.heavy_ms, et.ms - et.heavy_ms, ct.ms - ct.heavy_ms);
  h.remove();
  return 0;
}

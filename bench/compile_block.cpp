// Benchmark of compile/ on one Llama 3.1 8B decoder layer (hidden 4096, 32 heads, 8 KV heads, MLP
// 14336) in bf16 on CUDA at T tokens (default 4096): eager against compiled, forward and forward +
// backward, as milliseconds per call, the part spent in GEMMs and attention (timed op by op with CUDA
// events by a dispatch handler) and the rest ("outside": norms, residuals, activations, copies —
// what fusion targets), host milliseconds per call, kernels per layer, and the caching allocator's
// cudaMalloc + cudaFree calls per call once warm (each can stall the stream).
// `--qlora`: the layer of the 8B QLoRA job instead (NF4 base, LoRA r=16 on the seven linears; only the
// adapters train), with NF4 dequantisation timed as its own column. `--ops`: a table of every op's GPU
// time in one eager forward+backward, by op name. `--head`: the chunked LM head (V = 128256, frozen
// weight, T tokens) forward+backward with the built-in cross-entropy, nn::focal_loss(2) eager, and
// focal loss through compile::compile_loss.
// Rows: forward, forward+backward, and forward+backward with the layer checkpointed (its recompute leaves out
// what backward never reads: down_proj); eager and compiled alternate twice, after 3 s of warm-up.
// `--sequence`: one forward's ops in order, eager and compiled, each with its time to the next op's start.
// Usage: compile_block [T] [iterations] [--qlora] [--ops] [--head] [--sequence]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/checkpoint.h"
#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "bench/op_timer.h"
#include "compile/compile.h"
#include "core/cuda/runtime.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/shape.h"
#include "nn/chunked_loss.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"

namespace {

using kiln::Tensor;
namespace cuda = kiln::cuda;
const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::OpTimer;
using kiln::bench::is_dequant;
using kiln::bench::is_heavy;

struct Row {
  double ms, heavy_ms, dequant_ms, host_ms;
  int kernels;
  double mallocs;  // cudaMalloc + cudaFree calls of the caching allocator per call, once warm
};

// Mean per call over `iters` calls: GPU time (events on the stream), the GEMM/attention part of one
// instrumented call, host time per call.
Row measure(const std::function<void()>& step, int iters, const std::function<int()>& fused_kernels) {
  const double ms = kiln::bench::time_ms(step, iters);
  cuda::synchronize();
  const cuda::MemoryStats m0 = cuda::memory_stats();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) step();
  const auto t1 = std::chrono::steady_clock::now();
  cuda::synchronize();
  const cuda::MemoryStats m1 = cuda::memory_stats();
  OpTimer timer(false);
  {
    kiln::HandlerScope scope(&timer);
    step();
  }
  Row r;
  r.ms = ms;
  r.heavy_ms = timer.ms(is_heavy);
  r.dequant_ms = timer.ms(is_dequant);
  r.host_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
  r.kernels = timer.kernels + fused_kernels();
  r.mallocs = static_cast<double>(m1.num_cuda_mallocs + m1.num_cuda_frees - m0.num_cuda_mallocs - m0.num_cuda_frees) / iters;
  return r;
}

double outside(const Row& r) { return r.ms - r.heavy_ms - r.dequant_ms; }

void print(const char* name, const Row& r) {
  std::printf("%-34s %9.3f %11.3f %9.3f %11.3f %9.3f %8d %8.1f\n", name, r.ms, r.heavy_ms, r.dequant_ms, outside(r),
              r.host_ms, r.kernels, r.mallocs);
}

// One call of `step` seen by `handler`, after a call that warms up what the first builds.
void run_seen_by(kiln::DispatchHandler& handler, const std::function<void()>& step) {
  step();
  cuda::synchronize();
  kiln::HandlerScope scope(&handler);
  step();
}

// Every op of one call with CUDA events around it (their cost included): where the time outside GEMMs goes.
void print_ops(const char* title, const std::function<void()>& step) {
  OpTimer timer(true);
  run_seen_by(timer, step);
  std::printf("\n%s, op by op:\n%-44s %6s %9s\n", title, "op", "calls", "GPU ms");
  // GEMMs by shape and layout: compiled and eager calls of one GEMM side by side
  const auto key = [](const OpTimer::Span& s) { return s.gemm_shape.empty() ? s.name : "matmul " + s.gemm_shape; };
  for (const OpTimer::Row& r : timer.rows(key)) std::printf("%-44s %6d %9.3f\n", r.name.c_str(), r.calls, r.ms);
}

// One call's ops in the order they ran, an event recorded as each starts (one per op: the least a
// timing can disturb back-to-back kernels), with each op's time to the next op's start (gaps included),
// the inputs' shapes ("~": a strided view) and address alignment (bytes, up to 256).
struct SequenceTimer : kiln::DispatchHandler {
  struct Mark {
    std::string what;
    std::unique_ptr<cuda::Event> start;
  };
  std::vector<Mark> marks;
  std::vector<Tensor> run(const kiln::PrimitivePtr& op, const std::vector<Tensor>& in) override {
    if (op->is_view()) return kiln::dispatch_next(op, in);
    mark(*op, in);
    return kiln::dispatch_next(op, in);
  }
  void run_into(const kiln::PrimitivePtr& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) override {
    mark(*op, in);
    kiln::dispatch_next_into(op, in, out);
  }
  void mark(const kiln::Primitive& op, const std::vector<Tensor>& in) {
    std::string what = op.name();
    for (const Tensor& t : in) {
      what.push_back(' ');
      what.append(kiln::shape_str(t.shape()));
      if (!t.is_contiguous()) what.push_back('~');  // a strided view
      const auto addr = reinterpret_cast<uintptr_t>(t.raw_data());
      what.push_back('@');
      what.append(std::to_string(addr == 0 ? 0 : std::min<uintptr_t>(addr & (~addr + 1), 256)));
    }
    marks.push_back({what, std::make_unique<cuda::Event>(true)});
    marks.back().start->record();
  }
};

void print_sequence(const char* title, const std::function<void()>& step) {
  SequenceTimer timer;
  run_seen_by(timer, step);
  cuda::Event end(true);
  end.record();
  end.synchronize();
  std::printf("\n%s, op by op in order (ms to the next op's start):\n", title);
  for (size_t i = 0; i < timer.marks.size(); ++i) {
    const cuda::Event& next = i + 1 < timer.marks.size() ? *timer.marks[i + 1].start : end;
    std::printf("%8.3f  %s\n", static_cast<double>(timer.marks[i].start->elapsed_ms(next)), timer.marks[i].what.c_str());
  }
}

// The chunked LM head of Llama 3.1 8B (frozen bf16 weight), forward+backward, per loss function.
void loss_heads(int64_t t, int iters) {
  namespace nn = kiln::nn;
  constexpr int64_t kV = 128256, kH = 4096;
  const Tensor w = kiln::mul(kiln::randn({kV, kH}, kiln::DType::bf16, kGPU), 0.02);  // (V, H)
  Tensor x = kiln::randn({t, kH}, kiln::DType::bf16, kGPU).set_requires_grad(true);  // (T, H)
  const Tensor targets = kiln::randint(0, kV, {t}, kiln::DType::i64, kGPU);                // (T)
  kiln::compile::reset_stats();
  const nn::LossFn compiled_focal = kiln::compile::compile_loss(nn::focal_loss(2.0));
  const std::pair<const char*, nn::LossFn> losses[] = {
      {"cross-entropy (built-in)", nn::cross_entropy_loss()},
      {"focal loss, eager", nn::focal_loss(2.0)},
      {"focal loss, compiled", compiled_focal},
  };
  std::printf("\nchunked LM head, T=%lld, V=%lld, H=%lld, bf16, frozen weight, forward+backward:\n%-34s %9s\n",
              static_cast<long long>(t), static_cast<long long>(kV), static_cast<long long>(kH), "loss", "GPU ms");
  for (const auto& [name, fn] : losses) {
    const double ms = kiln::bench::time_ms([&] {
      kiln::nn::chunked_linear_loss(x, w, targets, fn).backward();
      x.zero_grad();
    }, iters);
    std::printf("%-34s %9.3f\n", name, ms);
  }
  const kiln::compile::Stats s = kiln::compile::stats();
  std::printf("compiled focal loss: %lld plans, %lld fused groups built, %lld fallback ops\n",
              static_cast<long long>(s.compilations), static_cast<long long>(s.fused_groups),
              static_cast<long long>(s.fallback_ops));
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  std::vector<std::string> pos;
  bool qlora = false, ops = false, head = false, sequence = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--qlora") qlora = true;
    else if (a == "--ops") ops = true;
    else if (a == "--sequence") sequence = true;
    else if (a == "--head") head = true;
    else pos.push_back(a);
  }
  const int64_t t = pos.size() > 0 ? std::atoll(pos[0].c_str()) : 4096;
  const int iters = pos.size() > 1 ? std::atoi(pos[1].c_str()) : 10;
  kiln::nn::LlamaConfig c = kiln::nn::LlamaConfig::named("llama3.1-8b");
  c.num_hidden_layers = 1;
  c.vocab_size = 128;  // the block is what is measured; a small embedding keeps memory for activations
  kiln::nn::LlamaOptions o;
  o.dtype = kiln::DType::bf16;
  o.device = kGPU;
  o.seed = 1;
  if (qlora) o.on_layer_built = [](const std::string&, kiln::nn::LlamaDecoderLayer& l) { kiln::nn::quantize_linears_nf4(l); };
  kiln::nn::Llama model(c, o);
  if (qlora) {
    kiln::nn::apply_lora(model, kiln::nn::LoraConfig{}, 2);
    model.train();
  }
  auto& layer = model.model().child_as<kiln::nn::ModuleList>("layers").at<kiln::nn::LlamaDecoderLayer>(0);
  const Tensor x = kiln::randn({1, t, c.hidden_size}, kiln::DType::bf16, kGPU);
  Tensor xg = x.detach().set_requires_grad(true);
  const Tensor g = kiln::randn({1, t, c.hidden_size}, kiln::DType::bf16, kGPU);
  auto forward = [&] {
    kiln::autograd::NoGradGuard ng;
    (void)layer(x);
  };
  auto train = [&] {  // as a training step has it: gradients start empty (the optimizer's zero_grad)
    layer.zero_grad();
    xg.zero_grad();
    Tensor y = layer(xg);
    y.backward(g);
  };
  auto train_checkpointed = [&] {  // the layer checkpointed: its forward runs again in backward
    layer.zero_grad();
    xg.zero_grad();
    Tensor y = kiln::autograd::checkpoint([&](const std::vector<Tensor>& in) { return std::vector<Tensor>{layer(in[0])}; },
                                          {xg})[0];
    y.backward(g);
  };
  const auto none = [] { return 0; };
  kiln::compile::CompileOptions co;
  co.dynamic_dims = {{0, 1}};
  co.name = "decoder layer";
  const auto forward_groups = [] { return static_cast<int>(kiln::compile::stats().last_forward_groups); };
  const auto train_groups = [] {
    const kiln::compile::Stats s = kiln::compile::stats();
    return static_cast<int>(s.last_forward_groups + s.last_backward_groups);
  };
  const auto checkpointed_groups = [] {  // the recompute runs the forward's plan again
    const kiln::compile::Stats s = kiln::compile::stats();
    return static_cast<int>(2 * s.last_forward_groups + s.last_backward_groups);
  };
  std::printf("Llama 3.1 8B decoder layer%s, bf16, B=1, T=%lld, %d iterations\n",
              qlora ? " (NF4 base, LoRA r=16 on 7 linears)" : "", static_cast<long long>(t), iters);
  // A GPU's clocks settle lower once it runs hot (power, heat): 3 s of training steps first, then eager and
  // compiled rows alternate, so neither is measured on a cooler card.
  for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3); std::chrono::steady_clock::now() < until;) {
    for (int i = 0; i < 10; ++i) train();
    cuda::synchronize();
  }
  std::printf("%-34s %9s %11s %9s %11s %9s %8s %8s\n", "", "GPU ms", "GEMM+attn", "dequant", "outside", "host ms", "kernels",
              "mallocs");
  kiln::compile::reset_stats();
  Row ef{}, et{}, ek{}, cf{}, ct{}, ck{};
  kiln::compile::Stats per_layer{};
  for (int round = 1; round <= 2; ++round) {
    const std::string tag = " #" + std::to_string(round);
    ef = measure(forward, iters, none);
    print(("eager forward" + tag).c_str(), ef);
    et = measure(train, iters, none);
    print(("eager forward+backward" + tag).c_str(), et);
    ek = measure(train_checkpointed, iters, none);
    print(("eager checkpointed fwd+bwd" + tag).c_str(), ek);
    kiln::HookHandle h = kiln::compile::compile_module(layer, co);
    cf = measure(forward, iters, forward_groups);
    print(("compiled forward" + tag).c_str(), cf);
    ct = measure(train, iters, train_groups);
    print(("compiled forward+backward" + tag).c_str(), ct);
    per_layer = kiln::compile::stats();  // one plain forward+backward's plans (the recompute runs a smaller one)
    ck = measure(train_checkpointed, iters, checkpointed_groups);
    print(("compiled checkpointed fwd+bwd" + tag).c_str(), ck);
    h.remove();
  }
  if (ops) {
    print_ops("eager forward", forward);
    print_ops("eager forward+backward", train);
  }
  if (sequence) print_sequence("eager forward", forward);
  if (ops || sequence) {
    kiln::HookHandle h = kiln::compile::compile_module(layer, co);
    if (ops) {
      print_ops("compiled forward (fused groups not listed)", forward);
      print_ops("compiled forward+backward (fused groups not listed)", train);
    }
    if (sequence) print_sequence("compiled forward (fused groups not listed)", forward);
    h.remove();
  }
  const kiln::compile::Stats s = kiln::compile::stats();
  std::printf("\ncompiled: %lld plans built, %lld adds in GEMM epilogues, %lld NVRTC compilations (%.0f ms), %lld kernels "
              "from the disk cache, %lld fallback ops\n",
              static_cast<long long>(s.compilations), static_cast<long long>(s.folded_adds),
              static_cast<long long>(s.kernel_compiles), s.kernel_compile_ms,
              static_cast<long long>(s.kernel_disk_hits), static_cast<long long>(s.fallback_ops));
  std::printf("per layer: forward %lld kernels (%lld fused groups), backward %lld kernels (%lld fused groups)\n",
              static_cast<long long>(per_layer.last_forward_kernels), static_cast<long long>(per_layer.last_forward_groups),
              static_cast<long long>(per_layer.last_backward_kernels), static_cast<long long>(per_layer.last_backward_groups));
  std::printf("outside GEMM+attention (round 2): forward %.3f -> %.3f ms, forward+backward %.3f -> %.3f ms, checkpointed "
              "%.3f -> %.3f ms\n",
              outside(ef), outside(cf), outside(et), outside(ct), outside(ek), outside(ck));
  if (head) loss_heads(t, iters);
  return 0;
}

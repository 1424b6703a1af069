// Benchmark of the LM head + cross-entropy, forward and backward, for Llama 3.1's vocabulary (V =
// 128256, H = 4096, bf16): kiln's naive head (matmul -> cast f32 -> cross_entropy -> backward)
// against nn::chunked_linear_loss, frozen and trainable weight: time, effective TFLOP/s (2*N*H*V per
// matmul pass: frozen = 2 passes, trainable = 3) and peak extra memory from the allocator's stats;
// then the time of one chunk's parts, generic and fused (the built-in cross-entropy), and one fused
// call at N 16384, chunk 512, op by op. Rows "in place": hidden made by an op in the step (as a model's
// final norm makes it) and d(hidden) written over it (overwrite_hidden); extra memory beyond that hidden.
// Usage: cuda_chunked_loss [iterations] [tokens] (tokens: only that row group, 16384 or 65536)
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "bench/op_timer.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "nn/chunked_loss.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;
namespace nn = kiln::nn;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};
constexpr int64_t kH = 4096, kV = 128256;
constexpr double kPeakTflops = 989.0;  // H200 dense bf16 tensor-core peak
int g_iters = 5;

using Head = std::function<Tensor(const Tensor& x, const Tensor& w, const Tensor& t)>;

Tensor naive_head(const Tensor& x, const Tensor& w, const Tensor& t) {
  return kiln::cross_entropy(kiln::cast(kiln::matmul(x, kiln::transpose(w, 0, 1)), DType::f32), t);  // (N, V) x2
}

// The built-in cross-entropy (the fused path); with `generic`, the same loss behind a lambda, which
// takes the generic path (f32 logits, autograd on each chunk).
// `overwrite`: ChunkedLossOptions::overwrite_hidden (for a hidden made by an op: see row's `made`).
Head chunked_head(size_t budget, bool generic = false, bool overwrite = false) {
  return [budget, generic, overwrite](const Tensor& x, const Tensor& w, const Tensor& t) {
    nn::ChunkedLossOptions o;
    o.memory_budget_bytes = budget;
    o.overwrite_hidden = overwrite;
    const nn::LossFn ce = nn::cross_entropy_loss();
    const nn::LossFn fn = generic ? nn::LossFn([ce](const Tensor& l, const Tensor& y) { return ce(l, y); }) : ce;
    return nn::chunked_linear_loss(x, w, t, fn, o);
  };
}

// `made`: the head gets hidden as a model does, made by an op (1.0 * x, as a final norm makes it) in the
// step; extra memory is then counted beyond that hidden's own N x H (an input, as x is otherwise).
void row(const std::string& name, int64_t n, bool trainable, const Head& head, const Tensor& weight,
         double* ref_ms = nullptr, bool made = false) {
  Tensor hidden = kiln::mul(kiln::randn({n, kH}, DType::bf16, kGPU), 1.0);  // (N, H)
  Tensor targets = kiln::randint(0, kV, {n}, DType::i64, kGPU);             // (N)
  Tensor x = hidden.detach();
  x.set_requires_grad(true);
  Tensor w = weight.detach();
  w.set_requires_grad(trainable);
  const auto step = [&] {
    head(made ? kiln::mul(x, 1.0) : x, w, targets).backward();
    x.zero_grad();
    w.zero_grad();
  };
  const size_t made_bytes = made ? static_cast<size_t>(n * kH) * 2 : 0;  // that hidden, bf16
  char label[160];
  std::snprintf(label, sizeof(label), "%-30s N=%-6lld %-9s", name.c_str(), static_cast<long long>(n),
                trainable ? "trainable" : "frozen");
  try {
    step();  // warm-up: GEMM plans, workspaces, allocator cache
    cuda::synchronize();
    const size_t before = cuda::memory_stats().allocated;
    cuda::reset_peak_memory_stats();
    step();
    cuda::synchronize();
    const double extra_gib =
        static_cast<double>(cuda::memory_stats().peak_allocated - before) / (1 << 30) - static_cast<double>(made_bytes) / (1 << 30);
    const double ms = kiln::bench::time_ms(step, g_iters, 0);
    const double flops = (trainable ? 3.0 : 2.0) * 2.0 * static_cast<double>(n) * kH * kV;
    const double tflops = flops / (ms * 1e-3) / 1e12;
    std::printf("%s %10.2f %9.1f %7.1f%% %12.3f", label, ms, tflops, 100.0 * tflops / kPeakTflops, extra_gib);
    if (ref_ms != nullptr && *ref_ms > 0) std::printf(" %9.3fx", ms / *ref_ms);
    if (ref_ms != nullptr && *ref_ms == 0) *ref_ms = ms;
    std::printf("\n");
  } catch (const kiln::Error& e) {
    x.zero_grad();
    w.zero_grad();
    cuda::synchronize();
    cuda::empty_cache();
    std::string msg = e.what();
    if (msg.size() > 90) msg = msg.substr(0, 90) + "...";
    std::printf("%s  does not fit: %s\n", label, msg.c_str());
    if (ref_ms != nullptr) *ref_ms = -1;
  }
  std::fflush(stdout);
}

// The time of each step of one chunk with a frozen weight, each timed alone (the loss uses
// cross_entropy_unchecked: no stream synchronisation).
void parts(int64_t c) {
  kiln::autograd::NoGradGuard no_grad;
  Tensor x = kiln::randn({c, kH}, DType::bf16, kGPU);
  Tensor w = kiln::mul(kiln::randn({kV, kH}, DType::bf16, kGPU), 0.02);
  Tensor t = kiln::randint(0, kV, {c}, DType::i64, kGPU);
  Tensor wt = kiln::transpose(w, 0, 1);
  Tensor l16, l32, loss, dl, dl16, dh;
  const auto show = [&](const char* name, double ms, double flops) {
    std::printf("  %-44s %8.3f ms %8.1f TFLOP/s\n", name, ms, flops > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0);
  };
  const double mm = 2.0 * static_cast<double>(c) * kH * kV;
  std::printf("one chunk of %lld tokens (frozen weight), parts:\n", static_cast<long long>(c));
  show("logits = x @ W^T (bf16)", kiln::bench::time_ms([&] { l16 = kiln::matmul(x, wt); }, 20), mm);
  show("cast -> f32", kiln::bench::time_ms([&] { l32 = kiln::cast(l16, DType::f32); }, 20), 0);
  Tensor leaf = l32.detach();
  leaf.set_requires_grad(true);
  show("loss + autograd grad (cross_entropy fwd+bwd)", kiln::bench::time_ms([&] {
         kiln::autograd::EnableGradGuard eg;
         Tensor s = kiln::sum(nn::cross_entropy_loss()(leaf, t));
         dl = kiln::autograd::grad({s}, {leaf})[0];
       }, 20), 0);
  show("cast dlogits -> bf16", kiln::bench::time_ms([&] { dl16 = kiln::cast(dl, DType::bf16); }, 20), 0);
  show("dh = dlogits @ W (bf16)", kiln::bench::time_ms([&] { dh = kiln::matmul(dl16, w); }, 20), mm);
  show("dW part = dlogits^T @ x (bf16, (V, H) out)",
       kiln::bench::time_ms([&] { dh = kiln::matmul(kiln::transpose(dl16, 0, 1), x); }, 20), mm);
}

// One chunk of the fused path (frozen weight): the logits GEMM, the loss-and-gradient kernel in
// place (bytes: the bf16 logits read twice and written once), d(hidden) rows by a GEMM into place.
void fused_parts(int64_t c) {
  kiln::autograd::NoGradGuard no_grad;
  Tensor x = kiln::randn({c, kH}, DType::bf16, kGPU);
  Tensor w = kiln::mul(kiln::randn({kV, kH}, DType::bf16, kGPU), 0.02);
  Tensor t = kiln::randint(0, kV, {c}, DType::i64, kGPU);
  Tensor wt = kiln::transpose(w, 0, 1);
  Tensor scale = kiln::scalar_tensor(1.0 / static_cast<double>(c), DType::f32, kGPU);
  Tensor l16 = kiln::matmul(x, wt), dh = kiln::empty({c, kH}, DType::bf16, kGPU);
  // bytes: the logits read once and written once, what memory must move (the kernel's second read of a row
  // mostly hits L2)
  const double mm = 2.0 * static_cast<double>(c) * kH * kV, bytes = 2.0 * static_cast<double>(c) * kV * 2;
  std::printf("one chunk of %lld tokens, fused cross-entropy (frozen weight), parts:\n", static_cast<long long>(c));
  const double g1 = kiln::bench::time_ms([&] { kiln::matmul_into(l16, x, wt); }, 20);
  std::printf("  %-44s %8.3f ms %8.1f TFLOP/s\n", "logits = x @ W^T (bf16, into place)", g1, mm / (g1 * 1e-3) / 1e12);
  const double k = kiln::bench::time_ms([&] { (void)kiln::cross_entropy_loss_grad_(l16, t, scale); }, 20);
  std::printf("  %-44s %8.3f ms %8.1f GB/s\n", "loss + dlogits in place (one kernel)", k, bytes / (k * 1e-3) / 1e9);
  const double g2 = kiln::bench::time_ms([&] { kiln::matmul_into(dh, l16, w); }, 20);
  std::printf("  %-44s %8.3f ms %8.1f TFLOP/s\n", "dh = dlogits @ W (bf16, into place)", g2, mm / (g2 * 1e-3) / 1e12);
}

// One fused forward+backward over n tokens (chunks of the given loss budget), op by op with events
// around each (their cost included): the GEMMs' rate inside the loop, and the time the ops leave idle.
void fused_ops(int64_t n, bool trainable, size_t budget, const Tensor& weight) {
  Tensor x = kiln::randn({n, kH}, DType::bf16, kGPU).set_requires_grad(true);  // (N, H)
  Tensor w = weight.detach();
  w.set_requires_grad(trainable);
  const Tensor targets = kiln::randint(0, kV, {n}, DType::i64, kGPU);  // (N)
  const Head head = chunked_head(budget);
  const auto step = [&] {
    head(x, w, targets).backward();
    x.zero_grad();
    w.zero_grad();
  };
  step();
  const double whole = kiln::bench::time_ms(step, g_iters, 0);
  kiln::bench::OpTimer timer(true);
  {
    kiln::HandlerScope scope(&timer);
    step();
  }
  std::printf("fused CE, N=%lld, chunk %lld, %s weight, op by op (one call; %.2f ms without events):\n",
              static_cast<long long>(n), static_cast<long long>(nn::chunked_loss_chunk_size(kV, DType::bf16, budget, true)),
              trainable ? "trainable" : "frozen", whole);
  double sum = 0;
  for (const kiln::bench::OpTimer::Row& r : timer.rows()) {
    sum += r.ms;
    std::printf("  %-34s %6d %9.3f ms", r.name.c_str(), r.calls, r.ms);
    if (r.flops > 0) std::printf(" %8.1f TFLOP/s", r.flops / (r.ms * 1e-3) / 1e12);
    std::printf("\n");
  }
  std::printf("  %-34s %6s %9.3f ms\n", "sum of ops", "", sum);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  g_iters = argc > 1 ? std::atoi(argv[1]) : 5;
  const int64_t only = argc > 2 ? std::atoll(argv[2]) : 0;  // 0: every token count
  Tensor weight = kiln::mul(kiln::randn({kV, kH}, DType::bf16, kGPU), 0.02);  // (V, H)
  const size_t budget = nn::ChunkedLossOptions{}.memory_budget_bytes;
  std::printf("LM head + cross-entropy fwd+bwd, H=%lld V=%lld bf16; chunked: default %.1f GiB budget -> chunk %lld\n",
              static_cast<long long>(kH), static_cast<long long>(kV), static_cast<double>(budget) / (1 << 30),
              static_cast<long long>(nn::chunked_loss_chunk_size(kV, DType::bf16, budget)));
  std::printf("%-30s %-8s %-9s %10s %9s %8s %12s %10s\n", "head", "tokens", "weight", "ms", "TFLOP/s", "of peak",
              "extra GiB", "vs naive");
  for (int64_t n : {int64_t{16384}, int64_t{65536}}) {
    if (only != 0 && n != only) continue;
    for (bool trainable : {false, true}) {
      double ref = 0;
      row("naive (full logits)", n, trainable, naive_head, weight, &ref);
      row("generic path (1 GiB budget)", n, trainable, chunked_head(size_t{1} << 30, true), weight, &ref);
      for (size_t mib : {128, 256, 512, 1024, 2048}) {  // fused: chunks of 512 .. 8192 tokens
        if (n != 16384 && mib != 2048) continue;
        const std::string name = "fused CE (" + std::to_string(mib) + " MiB: chunk " +
                                 std::to_string(nn::chunked_loss_chunk_size(kV, DType::bf16, mib << 20, true)) + ")";
        row(name, n, trainable, chunked_head(mib << 20), weight, &ref);
        if (mib <= 256)  // hidden made by an op, d(hidden) written over it
          row(name + ", in place", n, trainable, chunked_head(mib << 20, false, true), weight, &ref, true);
      }
    }
  }
  parts(nn::chunked_loss_chunk_size(kV, DType::bf16, size_t{1} << 30));
  fused_parts(nn::chunked_loss_chunk_size(kV, DType::bf16, size_t{256} << 20, true));
  for (bool trainable : {false, true}) fused_ops(16384, trainable, size_t{128} << 20, weight);
  return 0;
}

// Benchmark of compile/'s CPU executor (compile/cpu_exec.cpp: the interpreter of fused groups) against
// eager CPU kernels on the transformer block's fusable patterns, forward + backward: best wall ms of
// repeated calls, and the bytes the fused groups move per ms (inputs read and outputs written once); then
// the host cost of a call whose kernels are nothing (one token, no grad).
// Usage: cpu_compile [seconds_per_row] [tokens]; KILN_NUM_THREADS sets the thread count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "compile/compile.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Tensor;

struct Case {
  const char* name;
  std::function<std::vector<Tensor>(const std::vector<Tensor>&)> fn;
  std::vector<kiln::Shape> shapes;  // inputs, all requiring grad
};

// Best seconds of fn on fresh leaves: forward, then backward from a fixed random cotangent.
double time_fwd_bwd(const kiln::compile::Fn& fn, const std::vector<Tensor>& inputs, double budget_s) {
  std::vector<Tensor> leaves;
  for (const Tensor& t : inputs) leaves.push_back(t.detach().set_requires_grad(true));
  const std::vector<Tensor> probe = fn(leaves);
  kiln::Generator gen(3);
  const Tensor cot = kiln::randn(probe[0].shape(), DType::f32, kiln::kCPU, &gen).to(probe[0].dtype());
  auto once = [&] {
    const std::vector<Tensor> out = fn(leaves);
    (void)kiln::autograd::grad({out[0]}, leaves, {cot});
  };
  using clock = std::chrono::steady_clock;
  once();  // warm-up (the compiled side builds its plans here)
  double best = 1e30, spent = 0;
  int runs = 0;
  while ((spent < budget_s || runs < 3) && runs < 1000) {
    const auto t0 = clock::now();
    once();
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    best = std::min(best, s);
    spent += s;
    ++runs;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const double budget = argc > 1 ? std::atof(argv[1]) : 1.0;
  const int64_t t = argc > 2 ? std::atoll(argv[2]) : 1024;
  const int64_t h = 1024, inter = 2816;
  std::vector<Case> cases = {
      {"residual add + rms_norm", [](const std::vector<Tensor>& in) {
         return std::vector<Tensor>{kiln::rms_norm(in[0] + in[1], in[2], 1e-5)};
       }, {{t, h}, {t, h}, {h}}},
      {"swiglu (silu(gate) * up)", [](const std::vector<Tensor>& in) {
         return std::vector<Tensor>{kiln::silu(in[0]) * in[1]};
       }, {{t, inter}, {t, inter}}},
      {"softmax(x * 0.125) rows", [](const std::vector<Tensor>& in) {
         return std::vector<Tensor>{kiln::softmax(in[0] * 0.125, -1)};
       }, {{t, h}}},
      {"LoRA scale-and-add (base + 2 * lora)", [](const std::vector<Tensor>& in) {
         return std::vector<Tensor>{in[0] + in[1] * 2.0};
       }, {{t, h}, {t, h}}},
  };
  std::printf("CPU executor of compile/ against eager, forward + backward, %lld tokens (best of repeated calls)\n\n",
              static_cast<long long>(t));
  std::printf("| case | dtype | eager ms | compiled ms | compiled / eager | compiled GB/s |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (const Case& c : cases) {
    for (DType dt : {DType::f32, DType::bf16}) {
      kiln::Generator gen(7);
      std::vector<Tensor> inputs;
      double bytes = 0;
      for (const kiln::Shape& s : c.shapes) {
        inputs.push_back(kiln::randn(s, DType::f32, kiln::kCPU, &gen).to(dt));
        bytes += static_cast<double>(inputs.back().numel() * kiln::itemsize(dt));
      }
      bytes *= 3;  // forward reads the inputs; backward reads them and the cotangent and writes their gradients (about)
      const double eager = time_fwd_bwd(c.fn, inputs, budget);
      const kiln::compile::CompiledFunction compiled = kiln::compile::compile(c.fn);
      const double fused = time_fwd_bwd([&](const std::vector<Tensor>& in) { return compiled(in); }, inputs, budget);
      std::printf("| %s | %s | %.3f | %.3f | %.2f | %.1f |\n", c.name, kiln::dtype_name(dt), eager * 1e3, fused * 1e3,
                  fused / eager, bytes / fused / 1e9);
    }
  }
  // Host cost per call where the kernels are nothing: one token, no grad (tracing, plan lookup, dispatch).
  std::printf("\nOne token, no grad: microseconds per call (best of repeated calls)\n\n");
  std::printf("| case | eager us | compiled us |\n|---|---|---|\n");
  for (Case c : cases) {
    for (kiln::Shape& s : c.shapes) s.front() = s.size() > 1 ? 1 : s.front();  // (1, ...) rows; weights as they are
    kiln::Generator gen(9);
    std::vector<Tensor> inputs;
    for (const kiln::Shape& s : c.shapes) inputs.push_back(kiln::randn(s, DType::f32, kiln::kCPU, &gen));
    const kiln::compile::CompiledFunction compiled = kiln::compile::compile(c.fn);
    auto best_us = [&](const std::function<void()>& f) {
      f();
      double best = 1e30;
      for (int r = 0; r < 2000; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
      return best;
    };
    kiln::autograd::NoGradGuard no_grad;
    const double eager = best_us([&] { (void)c.fn(inputs); });
    const double fused = best_us([&] { (void)compiled(inputs); });
    std::printf("| %s | %.1f | %.1f |\n", c.name, eager, fused);
  }
  return 0;
}

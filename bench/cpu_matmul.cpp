// Benchmark of the CPU GEMM (core/cpu/gemm.h) behind matmul: GFLOP/s over square and LLM-like
// shapes, f32/f64/bf16/f16, with B row-major ("nn") or transposed ("nt", the x @ W^T of a linear
// layer); then kiln::matmul itself (dispatch included) on batched shapes.
// Usage: cpu_matmul [seconds_per_row]; KILN_NUM_THREADS sets the thread count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "core/cpu/gemm.h"
#include "core/cpu/parallel.h"
#include "core/ops.h"

namespace {

using kiln::bf16;
using kiln::compute_t;

struct Case {
  int64_t m, n, k;
  bool b_transposed;
};

// Best time in seconds of repeated runs of C (m, n) = A (m, k) @ B (k, n).
template <class T>
double time_gemm(const Case& cs, double budget_s) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> a(static_cast<size_t>(cs.m * cs.k));  // (m, k)
  std::vector<T> b(static_cast<size_t>(cs.k * cs.n));  // (k, n) or (n, k) when transposed
  std::vector<compute_t<T>> c(static_cast<size_t>(cs.m * cs.n));  // (m, n)
  for (auto& v : a) v = T(dist(rng));
  for (auto& v : b) v = T(dist(rng));
  kiln::cpu::MatrixRef<T> ar{a.data(), cs.k, 1};
  kiln::cpu::MatrixRef<T> br = cs.b_transposed ? kiln::cpu::MatrixRef<T>{b.data(), 1, cs.k}
                                               : kiln::cpu::MatrixRef<T>{b.data(), cs.n, 1};
  using clock = std::chrono::steady_clock;
  kiln::cpu::gemm<T>(cs.m, cs.n, cs.k, ar, br, c.data(), cs.n);  // warm-up
  double best = 1e30, spent = 0;
  int runs = 0;
  while ((spent < budget_s || runs < 3) && runs < 1000) {
    auto t0 = clock::now();
    kiln::cpu::gemm<T>(cs.m, cs.n, cs.k, ar, br, c.data(), cs.n);
    double s = std::chrono::duration<double>(clock::now() - t0).count();
    best = std::min(best, s);
    spent += s;
    ++runs;
  }
  return best;
}

template <class T>
void row(const char* dtype, const Case& cs, double budget_s) {
  double s = time_gemm<T>(cs, budget_s);
  double gflops = 2.0 * static_cast<double>(cs.m) * static_cast<double>(cs.n) * static_cast<double>(cs.k) / s / 1e9;
  std::string shape = std::to_string(cs.m) + "x" + std::to_string(cs.n) + "x" + std::to_string(cs.k);
  std::printf("| %-18s | %-5s | %-6s | %10.3f | %8.1f |\n", shape.c_str(), dtype, cs.b_transposed ? "nt" : "nn",
              s * 1e3, gflops);
}

// kiln::matmul(a, b) on (batch..., M, K) @ (batch..., K, N), b optionally a transposed view.
void op_row(const kiln::Shape& as, const kiln::Shape& bs, bool b_transposed, kiln::DType dtype, double budget_s) {
  kiln::autograd::NoGradGuard no_grad;
  kiln::Generator gen(7);
  kiln::Tensor a = kiln::randn(as, kiln::DType::f32, kiln::kCPU, &gen).to(dtype);
  kiln::Tensor b = kiln::randn(bs, kiln::DType::f32, kiln::kCPU, &gen).to(dtype);
  if (b_transposed) b = kiln::transpose(b, -2, -1);
  kiln::Tensor out = kiln::matmul(a, b);  // warm-up
  using clock = std::chrono::steady_clock;
  double best = 1e30, spent = 0;
  int runs = 0;
  while ((spent < budget_s || runs < 3) && runs < 1000) {
    auto t0 = clock::now();
    out = kiln::matmul(a, b);
    double s = std::chrono::duration<double>(clock::now() - t0).count();
    best = std::min(best, s);
    spent += s;
    ++runs;
  }
  const int64_t k = as.back();
  double flops = 2.0 * static_cast<double>(out.numel()) * static_cast<double>(k);
  std::string shape = kiln::shape_str(as) + " @ " + kiln::shape_str(b.shape());
  std::printf("| %-38s | %-5s | %10.3f | %8.1f |\n", shape.c_str(), kiln::dtype_name(dtype), best * 1e3,
              flops / best / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  double budget = argc > 1 ? std::atof(argv[1]) : 0.3;
  std::printf("cpu gemm, %d threads (best of repeated runs)\n\n", kiln::cpu::num_threads());
  std::printf("| %-18s | %-5s | %-6s | %10s | %8s |\n", "MxNxK", "dtype", "layout", "ms", "GFLOP/s");
  std::printf("|--------------------|-------|--------|------------|----------|\n");
  const std::vector<Case> square = {{64, 64, 64, false},     {128, 128, 128, false}, {256, 256, 256, false},
                                    {512, 512, 512, false},  {512, 512, 512, true},  {1024, 1024, 1024, false},
                                    {1024, 1024, 1024, true}};
  for (const Case& cs : square) row<float>("f32", cs, budget);
  // LLM-like: tokens x out_features x in_features, weight stored (out, in) -> x @ W^T
  const std::vector<Case> llm = {{256, 1024, 1024, true}, {128, 4096, 1024, true}, {1, 4096, 4096, true},
                                 {1, 4096, 4096, false}, {4096, 1, 1024, false}, {7, 4096, 512, true}};
  for (const Case& cs : llm) row<float>("f32", cs, budget);
  for (const Case& cs : {Case{512, 512, 512, false}, Case{1024, 1024, 1024, false}}) row<double>("f64", cs, budget);
  for (const Case& cs : {Case{512, 512, 512, false}, Case{512, 512, 512, true}}) row<bf16>("bf16", cs, budget);
  for (const Case& cs : {Case{512, 512, 512, false}}) row<kiln::f16>("f16", cs, budget);

  std::printf("\nkiln::matmul (dispatch, batching and bf16/f16 rounding included)\n\n");
  std::printf("| %-38s | %-5s | %10s | %8s |\n", "a @ b", "dtype", "ms", "GFLOP/s");
  std::printf("|----------------------------------------|-------|------------|----------|\n");
  for (kiln::DType dt : {kiln::DType::f32, kiln::DType::bf16}) {
    op_row({4, 128, 1024}, {1024, 1024}, true, dt, budget);        // linear layer: x @ W^T, batch folded
    op_row({8, 12, 128, 64}, {8, 12, 128, 64}, true, dt, budget);  // attention scores q @ k^T
    op_row({8, 12, 128, 128}, {8, 12, 128, 64}, false, dt, budget);  // attention @ v
  }
  return 0;
}

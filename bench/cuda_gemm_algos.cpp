// Every algorithm cuBLASLt's heuristic offers (up to 32) for the GEMMs that bound kiln's step and loss head,
// timed one by one on the same buffers: does a better one than the heuristic's first choice (what kiln runs
// unless KILN_GEMM_TUNE=1) exist, and how far is the best from the bf16 8192^3 figure? bf16 in and out, f32
// accumulation, 32 MiB workspace, shapes as kiln passes them (row-major names below; column-major to cuBLASLt).
// Usage: cuda_gemm_algos [iterations] [max algorithms]
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "autograd/grad_mode.h"
#include "bench/cublas_check.h"
#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;
const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::check_cublas;

// Row-major out (M, N) = a (M, K) @ b (K, N), where a is stored (M, K) or, with a_t, as (K, M) (a = stored^T),
// and b is stored (K, N) or, with b_t, as (N, K). To cuBLASLt (column-major): out^T (N, M) = op(b) op(a).
struct Case {
  const char* what;
  int64_t m, n, k;
  bool a_t, b_t;
};

struct Lt {
  cublasLtHandle_t handle = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = size_t{32} << 20;
  Lt() {
    check_cublas(cublasLtCreate(&handle), "cublasLtCreate");
    cudaMalloc(&ws, ws_bytes);
  }
  ~Lt() {
    cudaFree(ws);
    cublasLtDestroy(handle);
  }
};

void run_case(Lt& lt, const Case& c, int iters, int max_algos, cudaStream_t stream) {
  // stored shapes, row-major
  Tensor a = kiln::randn(c.a_t ? kiln::Shape{c.k, c.m} : kiln::Shape{c.m, c.k}, DType::bf16, kGPU);
  Tensor b = kiln::randn(c.b_t ? kiln::Shape{c.n, c.k} : kiln::Shape{c.k, c.n}, DType::bf16, kGPU);
  Tensor out = kiln::empty({c.m, c.n}, DType::bf16, kGPU);
  // column-major view: A' = b stored (col-major (N, K) ld N, or (K, N) ld K when b_t), B' = a likewise
  const cublasOperation_t op_a = c.b_t ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = c.a_t ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), "transa");
  check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), "transb");
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  if (c.b_t) check_cublas(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, u(c.k), u(c.n), c.k), "la");
  else check_cublas(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, u(c.n), u(c.k), c.n), "la");
  if (c.a_t) check_cublas(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, u(c.m), u(c.k), c.m), "lb");
  else check_cublas(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, u(c.k), u(c.m), c.k), "lb");
  check_cublas(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, u(c.n), u(c.m), c.n), "lc");
  cublasLtMatmulPreference_t pref = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&pref), "pref");
  check_cublas(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lt.ws_bytes, sizeof(lt.ws_bytes)),
      "pref ws");
  std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(max_algos));
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(lt.handle, desc, la, lb, lc, lc, pref, max_algos, results.data(), &found),
               "heuristic");
  const double flops = 2.0 * static_cast<double>(c.m) * static_cast<double>(c.n) * static_cast<double>(c.k);
  const float one = 1.0f, zero = 0.0f;
  std::vector<double> tflops;
  for (int i = 0; i < found; ++i) {
    const cublasLtMatmulAlgo_t* algo = &results[static_cast<size_t>(i)].algo;
    auto call = [&] {
      check_cublas(cublasLtMatmul(lt.handle, desc, &one, b.raw_data(), la, a.raw_data(), lb, &zero, out.raw_data(), lc,
                                  out.raw_data(), lc, algo, lt.ws, lt.ws_bytes, stream),
                   "cublasLtMatmul");
    };
    // two interleaved passes would need every algorithm twice in memory; the best of two timings instead
    const double ms = std::min(kiln::bench::time_ms(call, iters), kiln::bench::time_ms(call, iters));
    tflops.push_back(flops / (ms * 1e-3) / 1e12);
  }
  const double first = tflops.empty() ? 0.0 : tflops[0];
  const auto best = std::max_element(tflops.begin(), tflops.end());
  std::printf("%-34s %6lld %6lld %6lld %3s %3s %6d %10.1f %10.1f %5d %+7.1f%%  |", c.what, static_cast<long long>(c.m),
              static_cast<long long>(c.n), static_cast<long long>(c.k), c.a_t ? "T" : "N", c.b_t ? "T" : "N", found, first,
              best == tflops.end() ? 0.0 : *best, best == tflops.end() ? -1 : static_cast<int>(best - tflops.begin()),
              first > 0 && best != tflops.end() ? 100.0 * (*best / first - 1.0) : 0.0);
  for (double t : tflops) std::printf(" %.0f", t);
  std::printf("\n");
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  kiln::autograd::NoGradGuard no_grad;
  const int iters = argc > 1 ? std::atoi(argv[1]) : 10;
  const int max_algos = argc > 2 ? std::clamp(std::atoi(argv[2]), 1, 64) : 32;
  auto stream = static_cast<cudaStream_t>(cuda::current_stream().handle());
  const Case cases[] = {
      {"reference 8192^3", 8192, 8192, 8192, false, true},
      {"head logits h @ W^T (chunk 1024)", 1024, 128256, 4096, false, true},
      {"head d(hidden) dl @ W (chunk 1024)", 1024, 4096, 128256, false, false},
      {"head d(W) dl^T @ h (chunk 1024)", 128256, 4096, 1024, true, false},
      {"head logits (chunk 512)", 512, 128256, 4096, false, true},
      {"head d(hidden) (chunk 512)", 512, 4096, 128256, false, false},
      {"head d(W) (chunk 512)", 128256, 4096, 512, true, false},
      {"q/o x @ W^T", 4096, 4096, 4096, false, true},
      {"gate/up x @ W^T", 4096, 14336, 4096, false, true},
      {"down x @ W^T", 4096, 4096, 14336, false, true},
      {"gate/up d(x) dy @ W", 4096, 4096, 14336, false, false},
      {"down d(x) dy @ W", 4096, 14336, 4096, false, false},
      {"k/v x @ W^T", 4096, 1024, 4096, false, true},
      {"k/v d(x) dy @ W", 4096, 4096, 1024, false, false},
  };
  std::printf("bf16 GEMMs, f32 accumulation; TFLOP/s of each heuristic algorithm in the heuristic's order (%d iterations, "
              "best of 2)\n", iters);
  std::printf("%-34s %6s %6s %6s %3s %3s %6s %10s %10s %5s %8s  | all\n", "GEMM (row-major out (M, N), sum K)", "M", "N", "K",
              "a", "b", "algos", "first", "best", "which", "gain");
  Lt lt;
  for (const Case& c : cases) run_case(lt, c, iters, max_algos, stream);
  return 0;
}

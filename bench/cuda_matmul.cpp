// Benchmark of kiln's cuBLASLt matmul on the linear layers of Llama 3.1 8B in bf16: x (tokens, K) @
// W^T with W (N, K) passed as a transposed view (as nn::Linear does), against a bare cuBLASLt call
// on the same shapes and buffers in the same program (its best heuristic algorithm, 32 MiB
// workspace). Prints TFLOP/s of both and kiln's fraction of the bare figure (target >= 95%).
// Usage: cuda_matmul [iterations]
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "autograd/grad_mode.h"
#include "core/cuda/runtime.h"
#include "bench/cublas_check.h"
#include "bench/cuda_timing.h"
#include "core/ops.h"

namespace {

using kiln::DType;
using kiln::Tensor;
namespace cuda = kiln::cuda;

const kiln::Device kGPU{kiln::DeviceType::cuda, 0};

using kiln::bench::check_cublas;

using kiln::bench::time_ms;

// out (T, N) = x (T, K) @ w (N, K)^T with plain cuBLASLt: in column-major terms
// out^T (N, T) = op_T(w as (K, N) column-major, ld K) @ x^T (K, T) column-major, ld K.
struct BareGemm {
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void* ws = nullptr;
  size_t ws_bytes = size_t{32} << 20;

  BareGemm(int64_t t, int64_t k, int64_t n) {
    check_cublas(cublasLtCreate(&handle), "cublasLtCreate");
    cudaMalloc(&ws, ws_bytes);
    check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "transa");
    check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "transb");
    check_cublas(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k), "la");
    check_cublas(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(t), k), "lb");
    check_cublas(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, static_cast<uint64_t>(n), static_cast<uint64_t>(t), n), "lc");
    cublasLtMatmulPreference_t pref = nullptr;
    check_cublas(cublasLtMatmulPreferenceCreate(&pref), "pref");
    check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                      sizeof(ws_bytes)),
                 "pref ws");
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    check_cublas(cublasLtMatmulAlgoGetHeuristic(handle, desc, la, lb, lc, lc, pref, 1, &result, &found), "heuristic");
    if (found == 0) {
      std::fprintf(stderr, "no algorithm\n");
      std::exit(1);
    }
    algo = result.algo;
    cublasLtMatmulPreferenceDestroy(pref);
  }
  ~BareGemm() {
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    cudaFree(ws);
    cublasLtDestroy(handle);
  }
  void run(const void* w, const void* x, void* out, cudaStream_t s) const {
    const float one = 1.0f, zero = 0.0f;
    check_cublas(cublasLtMatmul(handle, desc, &one, w, la, x, lb, &zero, out, lc, out, lc, &algo, ws, ws_bytes, s),
                 "cublasLtMatmul");
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  kiln::autograd::NoGradGuard no_grad;
  const int iters = argc > 1 ? std::atoi(argv[1]) : 20;
  auto stream = static_cast<cudaStream_t>(cuda::current_stream().handle());
  struct Shape2 {
    int64_t k, n;
    const char* what;
  };
  const Shape2 shapes[] = {{4096, 4096, "q/o proj"}, {4096, 1024, "k/v proj"}, {4096, 14336, "gate/up"},
                           {14336, 4096, "down"}};
  std::printf("bf16 x (T, K) @ W^T, W (N, K) a transposed view; f32 accumulation\n");
  std::printf("%-9s %6s %6s %6s %12s %12s %8s\n", "layer", "T", "K", "N", "kiln TF/s", "cuBLASLt", "ratio");
  double worst = 1e9;
  for (int64_t t : {4096, 8192, 16384}) {
    for (const Shape2& sh : shapes) {
      Tensor x = kiln::randn({t, sh.k}, DType::bf16, kGPU);
      Tensor w = kiln::randn({sh.n, sh.k}, DType::bf16, kGPU);
      Tensor wt = kiln::transpose(w, 0, 1);  // (K, N) view, no copy
      Tensor out = kiln::empty({t, sh.n}, DType::bf16, kGPU);
      BareGemm bare(t, sh.k, sh.n);
      const double flops = 2.0 * static_cast<double>(t) * static_cast<double>(sh.k) * static_cast<double>(sh.n);
      // interleave the two measurements twice and keep each side's best, to even out clocks
      double kiln_ms = 1e30, bare_ms = 1e30;
      for (int rep = 0; rep < 2; ++rep) {
        Tensor y;
        kiln_ms = std::min(kiln_ms, time_ms([&] { y = kiln::matmul(x, wt); }, iters));
        bare_ms = std::min(bare_ms, time_ms([&] { bare.run(w.raw_data(), x.raw_data(), out.raw_data(), stream); }, iters));
      }
      const double kt = flops / (kiln_ms * 1e-3) / 1e12, bt = flops / (bare_ms * 1e-3) / 1e12;
      worst = std::min(worst, kt / bt);
      std::printf("%-9s %6lld %6lld %6lld %12.1f %12.1f %7.1f%%\n", sh.what, static_cast<long long>(t),
                  static_cast<long long>(sh.k), static_cast<long long>(sh.n), kt, bt, 100.0 * kt / bt);
    }
  }
  std::printf("lowest kiln / cuBLASLt ratio: %.1f%%\n", 100.0 * worst);
  return 0;
}

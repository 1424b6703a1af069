// The CPU GEMM behind matmul: C (M, N) (+)= A (M, K) @ B (K, N), with A and B read through any row
// and column strides (transposed, sliced, broadcast views), packed into cache-sized panels and
// multiplied by a register-blocked micro-kernel, in parallel over the cpu::parallel_for pool.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace kiln::cpu {

// A strided 2-d operand: element (i, j) lives at data[i * row_stride + j * col_stride] (elements).
template <class T>
struct MatrixRef {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
};

// C (m, n), row-major with leading dimension ldc, gets A (m, k) @ B (k, n) (added to C when
// `accumulate`). T is double, float, bf16 or f16; C holds compute_t<T> (double for f64, float
// otherwise: bf16/f16 are widened while packing and accumulate in f32). k == 0 gives zeros.
// Calls from inside a parallel_for run on the calling thread only.
template <class T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, compute_t<T>* c, int64_t ldc,
          bool accumulate = false);

extern template void gemm<double>(int64_t, int64_t, int64_t, MatrixRef<double>, MatrixRef<double>, double*, int64_t,
                                  bool);
extern template void gemm<float>(int64_t, int64_t, int64_t, MatrixRef<float>, MatrixRef<float>, float*, int64_t, bool);
extern template void gemm<bf16>(int64_t, int64_t, int64_t, MatrixRef<bf16>, MatrixRef<bf16>, float*, int64_t, bool);
extern template void gemm<f16>(int64_t, int64_t, int64_t, MatrixRef<f16>, MatrixRef<f16>, float*, int64_t, bool);

}  // namespace kiln::cpu

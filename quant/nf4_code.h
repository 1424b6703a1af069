// bitsandbytes' 8-bit code search (dQuantize), shared by the CPU quantiser (quant/nf4.cpp) and the
// CUDA one (quant/cuda/nf4.cu) so both pick the same code. fmt-free: nvcc compiles it too.
#pragma once
#include <cstdint>

#include "core/functors.h"

namespace kiln::quant::detail {

// The index of the entry of `code` (256 ascending values in [-1, 1]) nearest to x: seven halving steps
// from entry 127, then the nearer neighbour by midpoint. The midpoints are rounded products without
// FMA contraction (bnb's arithmetic; on the host nf4.cpp turns contraction off).
KILN_HD uint8_t dynamic_code_search(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f, val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[255];
  if (lower_pivot == 0) lower = code[0];
#if defined(__CUDA_ARCH__)
  const float mid_up = __fmul_rn(__fadd_rn(upper, val), 0.5f), mid_low = __fmul_rn(__fadd_rn(lower, val), 0.5f);
#else
  const float mid_up = (upper + val) * 0.5f, mid_low = (lower + val) * 0.5f;
#endif
  if (x > val) return static_cast<uint8_t>(x > mid_up ? upper_pivot : pivot);
  return static_cast<uint8_t>(x < mid_low ? lower_pivot : pivot);
}

}  // namespace kiln::quant::detail

// Launchers of the CUDA reductions (fmt-free; core/cuda/reduce.cu): sum/mean/amax/amin, argmax,
// logsumexp and softmax statistics over any set of dims, and softmax/log_softmax rows. Deterministic:
// a reduction split over blocks writes partials to a workspace, combined in a fixed order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

enum class RedOp : uint8_t { sum, mean, max, min, argmax, logsumexp, softmax_stats, log_softmax_stats };

// Output o (row-major over the kept dims) reduces the n_red elements at outer offset(o) + red
// offset(p), p row-major over the reduced dims (ordered so the innermost has the smallest stride).
struct ReduceLayout {
  int64_t n_out = 1;
  int64_t n_red = 1;
  Strided<1> outer;  // kept dims, input strides
  Strided<1> red;    // reduced dims, input strides
};

struct ReducePlan {
  bool columns = false;    // threads along outputs (adjacent in memory) rather than along the reduction
  int bx = 32, by = 1;     // block shape
  int vc = 1;              // adjacent outputs per thread on the column path
  int64_t chunks = 1;      // the reduction split over gridDim.y ...
  int64_t chunk_len = 0;   // ... in pieces of this many positions
  size_t workspace_bytes = 0;  // (chunks, n_out) partial accumulators when chunks > 1
};

// x: the input's device pointer (its alignment picks vector widths).
ReducePlan plan_reduce(RedOp op, DType dtype, const ReduceLayout& L, const void* x);

// Writes out[o] for every output: dtype for sum/mean/max/min of floats and max/min of ints,
// int64 for sum of ints/bool and argmax, dtype for logsumexp. Softmax statistics write shift to
// `out` and scale to `out2`, both in the compute type (double for f64, else float).
cudaError_t launch_reduce(RedOp op, DType dtype, const void* x, const ReduceLayout& L, const ReducePlan& plan, void* out,
                          void* out2, void* workspace, void* stream);

// Whether the one-kernel row softmax suits `rows` rows of `len` (else: statistics, then apply).
bool softmax_rows_fits(int64_t rows, int64_t len);
// softmax (log_softmax) of rows contiguous in x: row r at outer offset(r) in x, at r * len in y.
cudaError_t launch_softmax_rows(DType dtype, bool log, const void* x, const Strided<1>& outer, int64_t rows,
                                int64_t len, void* y, void* stream);
// y = exp(x - shift) * scale, or (x - shift) - scale for log; st: (y, x, shift, scale).
cudaError_t launch_softmax_apply(DType dtype, bool log, void* y, const void* x, const void* shift, const void* scale,
                                 const Strided<4>& st, int64_t n, void* stream);

}  // namespace kiln::cuda

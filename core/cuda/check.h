// Host-side (g++) checking of CUDA runtime calls: KILN_CUDA_CHECK(call, "op") throws kiln::Error
// "[op] <call> failed: <cuda error string>". Never used in .cu files (they return cudaError_t).
#pragma once
#include <cuda_runtime_api.h>

#include "core/error.h"

#define KILN_CUDA_CHECK(call, op)                                                                   \
  do {                                                                                              \
    cudaError_t kiln_err_ = (call);                                                                 \
    if (kiln_err_ != cudaSuccess) {                                                                 \
      throw ::kiln::Error(fmt::format("[{}] {} failed: {} ({})", op, #call, cudaGetErrorString(kiln_err_), \
                                      cudaGetErrorName(kiln_err_)));                                \
    }                                                                                               \
  } while (0)

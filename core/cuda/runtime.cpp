// CUDA runtime queries for a build with CUDA.
#include "core/cuda/runtime.h"

#include <cuda_runtime_api.h>

namespace kiln::cuda {

bool built_with_cuda() { return true; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace kiln::cuda

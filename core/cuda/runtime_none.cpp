// CUDA runtime queries for a CPU-only build.
#include "core/cuda/runtime.h"

namespace kiln::cuda {

bool built_with_cuda() { return false; }
int device_count() { return 0; }

}  // namespace kiln::cuda

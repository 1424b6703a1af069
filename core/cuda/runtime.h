// What the CUDA runtime reports: how many GPUs this process sees (0 without CUDA or without a GPU).
#pragma once

namespace kiln::cuda {

bool built_with_cuda();
int device_count();
inline bool is_available() { return device_count() > 0; }

}  // namespace kiln::cuda

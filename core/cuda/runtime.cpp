// CUDA runtime queries for a build with CUDA: device count, current device, device guard,
// synchronisation and the driver's free/total memory.
#include "core/cuda/runtime.h"

#include <cuda_runtime_api.h>

#include "core/cuda/check.h"

namespace kiln::cuda {

bool built_with_cuda() { return true; }

int device_count() {
  static const int n = [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();  // clear the "no device" / "no driver" error
      return 0;
    }
    return count;
  }();
  return n;
}

namespace {
int resolve(int device) {
  if (device < 0) return current_device();
  KILN_CHECK(device < device_count(), "cuda", "device cuda:{} does not exist ({} CUDA devices visible)", device,
             device_count());
  return device;
}
}  // namespace

int current_device() {
  KILN_CHECK(device_count() > 0, "cuda", "no CUDA device is visible");
  int d = 0;
  KILN_CUDA_CHECK(cudaGetDevice(&d), "cuda");
  return d;
}

void set_device(int device) {
  device = resolve(device);
  KILN_CUDA_CHECK(cudaSetDevice(device), "cuda");
}

void synchronize(int device) {
  DeviceGuard guard(resolve(device));
  KILN_CUDA_CHECK(cudaDeviceSynchronize(), "cuda");
}

void memory_info(size_t& free_bytes, size_t& total_bytes, int device) {
  DeviceGuard guard(resolve(device));
  KILN_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes), "cuda");
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  int current = 0;
  KILN_CUDA_CHECK(cudaGetDevice(&current), "cuda");
  if (current == device) return;
  KILN_CUDA_CHECK(cudaSetDevice(device), "cuda");
  previous_ = current;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

}  // namespace kiln::cuda

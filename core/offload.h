// A tensor parked in host memory until it is needed again (offloaded activation checkpoints). On a
// CUDA device the copy down is queued on the device's offload stream after the work that made the
// tensor, into page-locked memory, and the caller may drop the tensor at once: its block is not
// reused before the copy has read it. prefetch() queues the copy back up on the same stream;
// fetch() makes the current stream wait for it and returns the tensor. Both copies overlap with the
// kernels of the current stream. On the CPU the tensor already lives in host memory and is kept as
// it is.
#pragma once
#include <memory>

#include "core/tensor.h"

namespace kiln {

namespace cuda {
class Event;
}

class OffloadedTensor {
 public:
  explicit OffloadedTensor(const Tensor& t);  // t's values (not its autograd history)
  ~OffloadedTensor();
  OffloadedTensor(const OffloadedTensor&) = delete;
  OffloadedTensor& operator=(const OffloadedTensor&) = delete;

  // Starts the copy back to the device now (a no-op once started, and on the CPU).
  void prefetch();
  // The values on the original device, in a tensor ready on the current stream (prefetching first
  // if prefetch() was not called). Once only: the host copy is released.
  Tensor fetch();
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  Device device_;
  Shape shape_;
  DType dtype_;
  size_t nbytes_ = 0;
  Tensor host_;     // the host copy (CPU: the tensor itself)
  Tensor fetched_;  // on the device once prefetched
  std::unique_ptr<cuda::Event> ready_;  // recorded after the copy back
  bool taken_ = false;
};

}  // namespace kiln

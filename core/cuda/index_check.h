// Host side of the index checks done by CUDA kernels (embedding ids, cross-entropy targets): a device
// word the kernels flag the smallest bad position into with atomicMin, read back after the launch (one
// stream synchronisation), and the bad value itself, read from the device for the error message.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/check.h"
#include "core/ops.h"
#include "core/tensor.h"

namespace kiln::cuda {

constexpr unsigned long long kNoError = 0x7f7f7f7f7f7f7f7full;  // the byte pattern 0x7f: nothing flagged

// The device word index-checking kernels flag into (kNoError when nothing is wrong).
class IndexCheck {
 public:
  IndexCheck(const Tensor& like, void* stream, const char* op)
      : word_(empty({1}, DType::i64, like.device())), stream_(static_cast<cudaStream_t>(stream)), op_(op) {
    KILN_CUDA_CHECK(cudaMemsetAsync(word_.raw_data(), 0x7f, sizeof(unsigned long long), stream_), op_);
  }
  unsigned long long* ptr() const { return static_cast<unsigned long long*>(word_.raw_data()); }

  // Waits for the stream; the smallest flagged position, or -1.
  int64_t first_bad() const {
    thread_local unsigned long long* host = nullptr;  // pinned, kept for the thread
    if (host == nullptr) {
      KILN_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(unsigned long long), cudaHostAllocPortable),
                      op_);
    }
    KILN_CUDA_CHECK(cudaMemcpyAsync(host, ptr(), sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream_), op_);
    KILN_CUDA_CHECK(cudaStreamSynchronize(stream_), op_);
    return *host == kNoError ? -1 : static_cast<int64_t>(*host);
  }

 private:
  Tensor word_;
  cudaStream_t stream_;
  const char* op_;
};

// The value of an i64/i32 tensor at a flat (row-major) position, read from the device.
inline int64_t index_at(const Tensor& t, int64_t pos, const char* op) {
  int64_t off = 0, rem = pos;
  for (size_t d = t.shape().size(); d-- > 0;) {
    off += (rem % t.shape()[d]) * t.strides()[d];
    rem /= t.shape()[d];
  }
  const char* p = static_cast<const char*>(t.raw_data()) + off * static_cast<int64_t>(itemsize(t.dtype()));
  if (t.dtype() == DType::i64) {
    int64_t v = 0;
    KILN_CUDA_CHECK(cudaMemcpy(&v, p, sizeof(v), cudaMemcpyDeviceToHost), op);
    return v;
  }
  int32_t v = 0;
  KILN_CUDA_CHECK(cudaMemcpy(&v, p, sizeof(v), cudaMemcpyDeviceToHost), op);
  return v;
}

}  // namespace kiln::cuda

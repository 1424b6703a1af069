// The page-locked host memory cache (cudaHostAlloc blocks reused by size once the event fencing
// their last copies has completed) and memcpy_async.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "core/cuda/check.h"
#include "core/cuda/runtime.h"

namespace kiln::cuda {
namespace {

constexpr size_t kRound = size_t{1} << 20;  // blocks round up to 1 MiB so near sizes share them

class PinnedCache {
 public:
  void* take(size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest free block of at least `size` (at most twice it) whose fence has completed.
      for (auto it = free_.lower_bound(size); it != free_.end() && it->first <= 2 * size; ++it) {
        if (!completed(it->second.fence)) continue;
        if (it->second.fence != nullptr) cudaEventDestroy(it->second.fence);
        void* p = it->second.ptr;
        sizes_[p] = it->first;
        free_.erase(it);
        return p;
      }
    }
    void* p = nullptr;
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      release_completed();
      KILN_CUDA_CHECK(cudaHostAlloc(&p, size, cudaHostAllocPortable), "pinned memory");
    }
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = size;
    held_ += size;
    return p;
  }

  // Back to the cache, fenced by an event on `s` (recorded now, after every copy queued on it).
  void give_back(void* p, const Stream& s) {
    // Raw calls, no throwing: this runs in a storage's deleter, perhaps while the process exits.
    cudaEvent_t fence = nullptr;
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(s.device());
    if (cudaEventCreateWithFlags(&fence, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventRecord(fence, static_cast<cudaStream_t>(s.handle())) != cudaSuccess) {
      // No event: wait for the stream, so the block is free at once.
      cudaGetLastError();
      if (fence != nullptr) cudaEventDestroy(fence);
      fence = nullptr;
      cudaStreamSynchronize(static_cast<cudaStream_t>(s.handle()));
      cudaGetLastError();
    }
    cudaSetDevice(previous);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sizes_.find(p);
    free_.emplace(it->second, Free{p, fence});
    sizes_.erase(it);
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

 private:
  struct Free {
    void* ptr;
    cudaEvent_t fence;  // null: nothing to wait for
  };
  static bool completed(cudaEvent_t fence) {
    if (fence == nullptr) return true;
    if (cudaEventQuery(fence) == cudaSuccess) return true;
    cudaGetLastError();
    return false;
  }
  // cudaFreeHost of every free block whose fence has completed (before retrying a failed allocation).
  void release_completed() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end();) {
      if (!completed(it->second.fence)) {
        ++it;
        continue;
      }
      if (it->second.fence != nullptr) cudaEventDestroy(it->second.fence);
      cudaFreeHost(it->second.ptr);
      held_ -= it->first;
      it = free_.erase(it);
    }
  }

  std::mutex mu_;
  std::multimap<size_t, Free> free_;  // by size
  std::map<void*, size_t> sizes_;     // handed out: pointer -> block size
  size_t held_ = 0;
};

// Never destroyed: storages freed during static destruction still find it.
PinnedCache& cache() {
  static PinnedCache* c = new PinnedCache;
  return *c;
}

}  // namespace

Storage pinned_host_storage(size_t nbytes, const Stream& s) {
  const size_t size = (std::max<size_t>(nbytes, 1) + kRound - 1) / kRound * kRound;
  void* p = cache().take(size);
  std::shared_ptr<void> owner(p, [s](void* q) { cache().give_back(q, s); });
  return storage_from_blob(p, nbytes, kCPU, std::move(owner));
}

size_t pinned_host_bytes() { return cache().held(); }

void memcpy_async(void* dst, const void* src, size_t nbytes, const Stream& s) {
  if (nbytes == 0) return;
  DeviceGuard guard(s.device());
  KILN_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDefault, static_cast<cudaStream_t>(s.handle())), "copy");
}

}  // namespace kiln::cuda

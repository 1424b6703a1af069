// Refcounted memory a tensor points into. A Storage either owns its bytes (allocated through the
// allocator registered for its device) or views memory owned elsewhere (from_blob with a keep-alive
// owner): FSDP's flat all-gather buffer and mmapped safetensors are both such views.
#pragma once
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>

#include "core/device.h"

namespace kiln {

// Device memory allocators; CUDA's caching allocator registers itself for DeviceType::cuda.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes, Device device) = 0;
  virtual void deallocate(void* ptr, size_t nbytes, Device device) = 0;
};
void set_allocator(DeviceType type, Allocator* allocator);
Allocator* get_allocator(DeviceType type);  // throws kiln::Error if none is registered

// Bytes an allocator has handed out now and at most since its last peak reset. Read it for any
// device through memory_usage() (core/memory.h).
struct MemoryUsage {
  size_t allocated = 0;
  size_t peak = 0;
};
// The CPU allocator's counts (atomics; every thread's allocations, 64-byte rounded sizes). Memory a
// storage views (storage_from_blob: mmapped files, others' buffers) is not counted.
MemoryUsage cpu_memory_usage();
void reset_cpu_peak_memory();  // peak = allocated now

class StorageImpl {
 public:
  StorageImpl(void* data, size_t nbytes, Device device, std::function<void(void*)> deleter);
  ~StorageImpl();
  StorageImpl(const StorageImpl&) = delete;
  StorageImpl& operator=(const StorageImpl&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }
  // Bumped by every in-place write, so autograd can detect a saved tensor that changed.
  uint64_t version() const { return version_.load(std::memory_order_relaxed); }
  void bump_version() { version_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void* data_;
  size_t nbytes_;
  Device device_;
  std::function<void(void*)> deleter_;
  std::atomic<uint64_t> version_{0};
};

using Storage = std::shared_ptr<StorageImpl>;

Storage allocate_storage(size_t nbytes, Device device);
// A storage over memory owned elsewhere; `owner` is kept alive as long as the storage is.
Storage storage_from_blob(void* data, size_t nbytes, Device device, std::shared_ptr<void> owner);

}  // namespace kiln

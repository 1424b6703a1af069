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

// The CUDA runtime as kiln's host code sees it, without CUDA headers: device queries, streams and
// events (the current-stream guard that dist/ and compile/ build on), and the caching allocator's
// statistics. In a CPU-only build device_count() is 0 and everything else throws kiln::Error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/storage.h"

namespace kiln::cuda {

bool built_with_cuda();
int device_count();
inline bool is_available() { return device_count() > 0; }
int current_device();
void set_device(int device);
void synchronize(int device = -1);  // -1: the current device
// Free and total bytes of the device's memory as the driver reports them (cudaMemGetInfo).
void memory_info(size_t& free_bytes, size_t& total_bytes, int device = -1);

// Makes `device` current for the scope (a no-op when it already is); -1 leaves it unchanged.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// A CUDA stream handle (non-owning unless made by create()). handle() is a cudaStream_t. Owned
// streams are non-blocking; the last owner synchronises the stream before destroying it, so memory
// the caching allocator handed out on it is never reused while its work still runs.
class Stream {
 public:
  Stream() = default;
  static Stream create(int device = -1, bool high_priority = false);  // a new owned stream
  // The legacy default stream (handle 0). Not the per-thread one: its handle is the same value in
  // every thread, which would let the allocator hand one thread's block to another's stream.
  static Stream default_stream(int device = -1);
  void* handle() const { return handle_; }
  int device() const { return device_; }
  void synchronize() const;
  bool query() const;  // true when all work on it has finished
  friend bool operator==(const Stream& a, const Stream& b) { return a.handle_ == b.handle_ && a.device_ == b.device_; }

 private:
  Stream(void* h, int d, std::shared_ptr<void> owner) : handle_(h), device_(d), owner_(std::move(owner)) {}
  void* handle_ = nullptr;
  int device_ = 0;
  std::shared_ptr<void> owner_;
};

// The stream kernels of `device` launch on, on this thread (default_stream until a guard sets one).
Stream current_stream(int device = -1);
// Makes `s` the current stream of its device (and that device current) for the scope.
class StreamGuard {
 public:
  explicit StreamGuard(const Stream& s);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  Stream previous_;
  int previous_device_;
};

class Event {
 public:
  explicit Event(bool timing = false);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(const Stream& s);
  void record() { record(current_stream()); }
  void wait(const Stream& s) const;  // work queued on s after this waits for the event
  void synchronize() const;
  bool query() const;
  float elapsed_ms(const Event& end) const;  // both recorded with timing=true
  void* handle() const { return handle_; }  // null until first recorded (created on that device)

 private:
  void* handle_ = nullptr;
  int device_ = 0;
  bool timing_ = false;
};

struct MemoryStats {
  size_t allocated = 0;       // bytes in blocks handed out now
  size_t reserved = 0;        // bytes held from cudaMalloc (cached + allocated)
  size_t peak_allocated = 0;
  size_t peak_reserved = 0;
  uint64_t num_cuda_mallocs = 0;
  uint64_t num_cuda_frees = 0;
  uint64_t num_allocs = 0;    // allocate() calls served
  uint64_t num_ooms = 0;
};
MemoryStats memory_stats(int device = -1);
void reset_peak_memory_stats(int device = -1);
// Returns every cached, unused block to the driver.
void empty_cache();
// The block behind `storage` will be used on stream `s` too: it is not reused until the work queued
// on `s` up to now has finished (an event fence), even after it is freed.
// Storages that view part of an allocation (storage_from_blob over a larger buffer) are found too;
// memory not from the caching allocator is ignored.
void record_stream(const Storage& storage, const Stream& s);

// Page-locked host memory for asynchronous copies, from a cache (pinned.cpp): a CPU Storage of
// nbytes whose every copy is queued on `s`. When the storage is freed, an event on `s` fences the
// block, and the cache hands it out again only after that event has completed.
Storage pinned_host_storage(size_t nbytes, const Stream& s);
size_t pinned_host_bytes();  // page-locked bytes the cache holds (handed out and free)
// Queues a copy of nbytes between host and device memory (either direction, as the pointers say)
// on `s` and returns at once; with pageable host memory the driver may stage it synchronously.
void memcpy_async(void* dst, const void* src, size_t nbytes, const Stream& s);

// The allocator registered for DeviceType::cuda (kiln::get_allocator returns it).
Allocator* caching_allocator();

}  // namespace kiln::cuda

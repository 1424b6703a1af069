// Storage and the CPU allocator (64-byte aligned, so 16-byte vector loads and cache lines line up).
#include "core/storage.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <new>

#include "core/error.h"
#include "core/registry.h"

namespace kiln {
namespace {

size_t rounded_size(size_t nbytes) { return (std::max<size_t>(nbytes, 1) + 63) / 64 * 64; }

// The CPU allocator's byte counts: allocated now and the peak since the last reset.
std::atomic<size_t> cpu_allocated{0};
std::atomic<size_t> cpu_peak{0};

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes, Device) override {
    const size_t rounded = rounded_size(nbytes);
    void* p = std::aligned_alloc(64, rounded);
    KILN_CHECK(p != nullptr, "alloc", "out of host memory allocating {} bytes", nbytes);
    const size_t now = cpu_allocated.fetch_add(rounded, std::memory_order_relaxed) + rounded;
    size_t peak = cpu_peak.load(std::memory_order_relaxed);
    while (now > peak && !cpu_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
    return p;
  }
  void deallocate(void* ptr, size_t nbytes, Device) override {
    std::free(ptr);
    cpu_allocated.fetch_sub(rounded_size(nbytes), std::memory_order_relaxed);
  }
};

std::array<Allocator*, kNumDeviceTypes>& allocators() {
  static std::array<Allocator*, kNumDeviceTypes> table{};
  return table;
}

}  // namespace

KILN_REGISTER(cpu_allocator) {
  static CpuAllocator cpu;
  set_allocator(DeviceType::cpu, &cpu);
}

void set_allocator(DeviceType type, Allocator* allocator) { allocators()[static_cast<int>(type)] = allocator; }

Allocator* get_allocator(DeviceType type) {
  run_registrations();
  Allocator* a = allocators()[static_cast<int>(type)];
  KILN_CHECK(a != nullptr, "alloc", "no allocator for device type {}; was kiln built with CUDA?",
             type == DeviceType::cuda ? "cuda" : "cpu");
  return a;
}

StorageImpl::StorageImpl(void* data, size_t nbytes, Device device, std::function<void(void*)> deleter)
    : data_(data), nbytes_(nbytes), device_(device), deleter_(std::move(deleter)) {}

StorageImpl::~StorageImpl() {
  if (deleter_) deleter_(data_);
}

MemoryUsage cpu_memory_usage() {
  return {cpu_allocated.load(std::memory_order_relaxed), cpu_peak.load(std::memory_order_relaxed)};
}

void reset_cpu_peak_memory() { cpu_peak.store(cpu_allocated.load(std::memory_order_relaxed), std::memory_order_relaxed); }

Storage allocate_storage(size_t nbytes, Device device) {
  Allocator* a = get_allocator(device.type);
  void* p = a->allocate(nbytes, device);
  return std::make_shared<StorageImpl>(p, nbytes, device, [a, nbytes, device](void* q) { a->deallocate(q, nbytes, device); });
}

Storage storage_from_blob(void* data, size_t nbytes, Device device, std::shared_ptr<void> owner) {
  return std::make_shared<StorageImpl>(data, nbytes, device, [owner = std::move(owner)](void*) mutable { owner.reset(); });
}

}  // namespace kiln

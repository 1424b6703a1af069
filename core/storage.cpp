// Storage and the CPU allocator (64-byte aligned, so 16-byte vector loads and cache lines line up).
#include "core/storage.h"

#include <array>
#include <cstdlib>
#include <new>

#include "core/error.h"
#include "core/registry.h"

namespace kiln {
namespace {

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes, Device) override {
    size_t rounded = (std::max<size_t>(nbytes, 1) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    KILN_CHECK(p != nullptr, "alloc", "out of host memory allocating {} bytes", nbytes);
    return p;
  }
  void deallocate(void* ptr, size_t, Device) override { std::free(ptr); }
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

Storage allocate_storage(size_t nbytes, Device device) {
  Allocator* a = get_allocator(device.type);
  void* p = a->allocate(nbytes, device);
  return std::make_shared<StorageImpl>(p, nbytes, device, [a, nbytes, device](void* q) { a->deallocate(q, nbytes, device); });
}

Storage storage_from_blob(void* data, size_t nbytes, Device device, std::shared_ptr<void> owner) {
  return std::make_shared<StorageImpl>(data, nbytes, device, [owner = std::move(owner)](void*) mutable { owner.reset(); });
}

}  // namespace kiln

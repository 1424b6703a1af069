// The host CUDA API (core/cuda/runtime.h, matmul.h) in a CPU-only build: no devices, and every other
// call throws kiln::Error.
#include "core/cuda/matmul.h"
#include "core/cuda/runtime.h"
#include "core/error.h"

namespace kiln::cuda {
namespace {
[[noreturn]] void no_cuda() { throw Error("[cuda] kiln was built without CUDA"); }
}  // namespace

bool built_with_cuda() { return false; }
int device_count() { return 0; }
int current_device() { no_cuda(); }
void set_device(int) { no_cuda(); }
void synchronize(int) { no_cuda(); }
void memory_info(size_t&, size_t&, int) { no_cuda(); }

DeviceGuard::DeviceGuard(int) { no_cuda(); }
DeviceGuard::~DeviceGuard() = default;

Stream Stream::create(int, bool) { no_cuda(); }
Stream Stream::default_stream(int) { no_cuda(); }
void Stream::synchronize() const { no_cuda(); }
bool Stream::query() const { no_cuda(); }
Stream current_stream(int) { no_cuda(); }

StreamGuard::StreamGuard(const Stream&) : previous_device_(0) { no_cuda(); }
StreamGuard::~StreamGuard() = default;

Event::Event(bool) { no_cuda(); }
Event::~Event() = default;
void Event::record(const Stream&) { no_cuda(); }
void Event::wait(const Stream&) const { no_cuda(); }
void Event::synchronize() const { no_cuda(); }
bool Event::query() const { no_cuda(); }
float Event::elapsed_ms(const Event&) const { no_cuda(); }

MemoryStats memory_stats(int) { no_cuda(); }
void reset_peak_memory_stats(int) { no_cuda(); }
void empty_cache() { no_cuda(); }
void record_stream(const Storage&, const Stream&) { no_cuda(); }
Allocator* caching_allocator() { no_cuda(); }
Storage pinned_host_storage(size_t, const Stream&) { no_cuda(); }
size_t pinned_host_bytes() { return 0; }
void memcpy_async(void*, const void*, size_t, const Stream&) { no_cuda(); }

void set_allow_tf32(bool) { no_cuda(); }
bool allow_tf32() { return false; }
void set_gemm_tuning(bool) { no_cuda(); }
bool gemm_tuning() { return false; }

}  // namespace kiln::cuda

// Streams (owned non-blocking streams, the legacy default stream), the thread-local current stream
// per device with its guard, and events (record, cross-stream wait, timing).
#include <cuda_runtime_api.h>

#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/runtime.h"

namespace kiln::cuda {
namespace {

int resolve(int device) {
  if (device < 0) return current_device();
  KILN_CHECK(device < device_count(), "cuda stream", "device cuda:{} does not exist ({} CUDA devices visible)", device,
             device_count());
  return device;
}

cudaStream_t raw(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

// This thread's current stream per device; an empty slot means the default stream.
std::vector<Stream>& current_streams() {
  thread_local std::vector<Stream> streams;
  if (streams.empty()) {
    int n = device_count();
    for (int d = 0; d < n; ++d) streams.push_back(Stream::default_stream(d));
  }
  return streams;
}

}  // namespace

Stream Stream::create(int device, bool high_priority) {
  device = resolve(device);
  DeviceGuard guard(device);
  int least = 0, greatest = 0;
  KILN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cuda stream");
  cudaStream_t s = nullptr;
  KILN_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, high_priority ? greatest : least), "cuda stream");
  // The last owner waits for the stream's work: memory freed on it may be handed out again at once.
  std::shared_ptr<void> owner(static_cast<void*>(s), [device](void* h) {
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device);
    cudaStreamSynchronize(static_cast<cudaStream_t>(h));
    cudaStreamDestroy(static_cast<cudaStream_t>(h));
    cudaSetDevice(previous);
  });
  return Stream(static_cast<void*>(s), device, std::move(owner));
}

Stream Stream::default_stream(int device) { return Stream(nullptr, resolve(device), nullptr); }

void Stream::synchronize() const {
  DeviceGuard guard(device_);
  KILN_CUDA_CHECK(cudaStreamSynchronize(raw(*this)), "cuda stream");
}

bool Stream::query() const {
  DeviceGuard guard(device_);
  cudaError_t e = cudaStreamQuery(raw(*this));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  KILN_CUDA_CHECK(e, "cuda stream");
  return true;
}

Stream current_stream(int device) {
  device = resolve(device);
  return current_streams()[static_cast<size_t>(device)];
}

StreamGuard::StreamGuard(const Stream& s) : previous_(current_stream(s.device())), previous_device_(current_device()) {
  KILN_CUDA_CHECK(cudaSetDevice(s.device()), "cuda stream");
  current_streams()[static_cast<size_t>(s.device())] = s;
}

StreamGuard::~StreamGuard() {
  current_streams()[static_cast<size_t>(previous_.device())] = previous_;
  cudaSetDevice(previous_device_);
}

Event::Event(bool timing) : timing_(timing) {
  KILN_CHECK(device_count() > 0, "cuda event", "no CUDA device is visible");
}

Event::~Event() {
  if (handle_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(handle_));  // any device may be current
}

void Event::record(const Stream& s) {
  // An event belongs to one device: (re)create it on the stream's device.
  if (handle_ != nullptr && device_ != s.device()) {
    cudaEventDestroy(static_cast<cudaEvent_t>(handle_));
    handle_ = nullptr;
  }
  DeviceGuard guard(s.device());
  if (handle_ == nullptr) {
    cudaEvent_t e = nullptr;
    KILN_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing_ ? cudaEventDefault : cudaEventDisableTiming), "cuda event");
    handle_ = e;
    device_ = s.device();
  }
  KILN_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(handle_), raw(s)), "cuda event");
}

void Event::wait(const Stream& s) const {
  if (handle_ == nullptr) return;  // never recorded: nothing to wait for
  DeviceGuard guard(s.device());
  KILN_CUDA_CHECK(cudaStreamWaitEvent(raw(s), static_cast<cudaEvent_t>(handle_), 0), "cuda event");
}

void Event::synchronize() const {
  if (handle_ == nullptr) return;
  DeviceGuard guard(device_);
  KILN_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(handle_)), "cuda event");
}

bool Event::query() const {
  if (handle_ == nullptr) return true;
  DeviceGuard guard(device_);
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(handle_));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  KILN_CUDA_CHECK(e, "cuda event");
  return true;
}

float Event::elapsed_ms(const Event& end) const {
  KILN_CHECK(timing_ && end.timing_, "cuda event", "elapsed_ms needs two events made with timing=true");
  KILN_CHECK(handle_ != nullptr && end.handle_ != nullptr, "cuda event", "elapsed_ms needs two recorded events");
  KILN_CHECK(device_ == end.device_, "cuda event", "events on cuda:{} and cuda:{} cannot be timed against each other",
             device_, end.device_);
  float ms = 0.0f;
  DeviceGuard guard(device_);
  KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(handle_), static_cast<cudaEvent_t>(end.handle_)),
                  "cuda event");
  return ms;
}

}  // namespace kiln::cuda

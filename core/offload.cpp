// OffloadedTensor: one offload stream per CUDA device, pinned host copies, event-ordered transfers.
#include "core/offload.h"

#include <mutex>
#include <vector>

#include "core/cuda/runtime.h"

namespace kiln {
namespace {

constexpr const char* kOp = "offload";

// The side stream host<->device copies of offloaded tensors run on, per device (made on first use,
// never destroyed: pinned blocks freed at exit still record events on it).
cuda::Stream offload_stream(int device) {
  static std::mutex mu;
  static auto* streams = new std::vector<cuda::Stream>(static_cast<size_t>(cuda::device_count()));
  std::lock_guard<std::mutex> lock(mu);
  cuda::Stream& s = streams->at(static_cast<size_t>(device));
  if (s.handle() == nullptr) s = cuda::Stream::create(device);
  return s;
}

// Work queued on `side` from now on waits for what the current stream of `device` has queued so far.
void after_current_stream(int device, const cuda::Stream& side) {
  cuda::Event queued;
  queued.record(cuda::current_stream(device));
  queued.wait(side);
}

}  // namespace

OffloadedTensor::OffloadedTensor(const Tensor& t)
    : device_(t.device()), shape_(t.shape()), dtype_(t.dtype()), nbytes_(t.nbytes()) {
  KILN_CHECK(t.defined(), kOp, "cannot offload an undefined tensor");
  Tensor src = t.detach().contiguous();
  if (device_.is_cpu()) {
    host_ = src;
    return;
  }
  KILN_CHECK(device_.is_cuda(), kOp, "tensors on {} cannot be offloaded", device_.str());
  cuda::DeviceGuard guard(device_.index);
  const cuda::Stream side = offload_stream(device_.index);
  after_current_stream(device_.index, side);  // the work that produced t
  Storage pinned = cuda::pinned_host_storage(nbytes_, side);
  host_ = from_blob(pinned->data(), shape_, dtype_, kCPU, pinned);
  cuda::memcpy_async(host_.raw_data(), src.raw_data(), nbytes_, side);
  cuda::record_stream(src.storage(), side);  // src's block waits for the copy before reuse
}

OffloadedTensor::~OffloadedTensor() = default;

void OffloadedTensor::prefetch() {
  KILN_CHECK(!taken_, kOp, "the tensor was already fetched");
  if (device_.is_cpu() || fetched_.defined()) return;
  cuda::DeviceGuard guard(device_.index);
  const cuda::Stream side = offload_stream(device_.index);
  Tensor dev = empty(shape_, dtype_, device_);  // (shape_) allocated for the current stream
  after_current_stream(device_.index, side);  // the block's earlier users are done before it is written
  cuda::memcpy_async(dev.raw_data(), host_.raw_data(), nbytes_, side);
  cuda::record_stream(dev.storage(), side);
  ready_ = std::make_unique<cuda::Event>();
  ready_->record(side);
  fetched_ = dev;
}

Tensor OffloadedTensor::fetch() {
  KILN_CHECK(!taken_, kOp, "the tensor was already fetched");
  Tensor out;
  if (device_.is_cpu()) {
    out = host_;
  } else {
    prefetch();
    ready_->wait(cuda::current_stream(device_.index));
    out = fetched_;
    fetched_ = Tensor();
  }
  host_ = Tensor();  // the pinned block goes back to the cache, fenced after the copy back
  taken_ = true;
  return out;
}

}  // namespace kiln

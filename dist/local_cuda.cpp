// The GPU half of the local backend: one high-priority collective stream per device; device-to-device
// copies for all_gather and broadcast, the reduce kernel (dist/reduce_cuda.cu) for the reductions.
#include "dist/local_cuda.h"

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>

#include "core/cuda/check.h"
#include "dist/reduce_cuda.cuh"

namespace kiln::dist {
namespace {

cuda::Stream collective_stream(int device) {
  static std::mutex mutex;
  static std::map<int, cuda::Stream> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) it = streams.emplace(device, cuda::Stream::create(device, /*high_priority=*/true)).first;
  return it->second;
}

void copy(void* dst, const void* src, size_t bytes, cudaStream_t s, const char* op) {
  if (bytes == 0 || dst == src) return;
  KILN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s), op);
}

void reduce(const Call& first, bool max, const std::vector<const void*>& srcs, const std::vector<void*>& dsts,
            int64_t count, cudaStream_t s) {
  KILN_CHECK(srcs.size() <= kMaxReduceBuffers && dsts.size() <= kMaxReduceBuffers, first.name(),
             "the local CUDA backend reduces over at most {} ranks, found {}", kMaxReduceBuffers, srcs.size());
  ReduceBuffers b;
  for (const void* p : srcs) b.srcs[b.num_srcs++] = p;
  for (void* p : dsts) b.dsts[b.num_dsts++] = p;
  KILN_CUDA_CHECK(launch_reduce(first.input.dtype(), max, b, count, s), first.name());
}

}  // namespace

void local_cuda_enqueue(const std::vector<Call>& calls, const std::vector<std::unique_ptr<cuda::Event>>& ready,
                        cuda::Event& done) {
  const Call& first = calls[0];
  const int device = first.input.device().index;
  cuda::DeviceGuard guard(device);
  const cuda::Stream stream = collective_stream(device);
  auto s = static_cast<cudaStream_t>(stream.handle());
  for (const auto& e : ready) e->wait(stream);
  const size_t n = calls.size();
  switch (first.kind) {
    case Collective::barrier: break;
    case Collective::all_gather: {
      const size_t bytes = first.input.nbytes();
      for (size_t r = 0; r < n; ++r) {
        auto* out = static_cast<char*>(calls[r].output.raw_data());
        for (size_t src = 0; src < n; ++src) copy(out + src * bytes, calls[src].input.raw_data(), bytes, s, first.name());
      }
      break;
    }
    case Collective::broadcast: {
      const Call& root = calls[static_cast<size_t>(first.root)];
      for (size_t r = 0; r < n; ++r) copy(calls[r].output.raw_data(), root.input.raw_data(), root.input.nbytes(), s, first.name());
      break;
    }
    case Collective::reduce_scatter: {
      const size_t chunk = first.output.nbytes();
      for (size_t r = 0; r < n; ++r) {
        std::vector<const void*> srcs;
        for (size_t src = 0; src < n; ++src) srcs.push_back(static_cast<const char*>(calls[src].input.raw_data()) + r * chunk);
        reduce(first, false, srcs, {calls[r].output.raw_data()}, first.output.numel(), s);
      }
      break;
    }
    case Collective::all_reduce: {
      std::vector<const void*> srcs;
      std::vector<void*> dsts;
      for (const Call& c : calls) {
        srcs.push_back(c.input.raw_data());
        dsts.push_back(c.output.raw_data());
      }
      reduce(first, first.op == ReduceOp::max, srcs, dsts, first.input.numel(), s);
      break;
    }
  }
  done.record(stream);
  // The ranks' memory is in use on the collective stream until `done`.
  for (const Call& c : calls) {
    if (c.input.defined()) cuda::record_stream(c.input.storage(), stream);
    if (c.output.defined()) cuda::record_stream(c.output.storage(), stream);
  }
}

}  // namespace kiln::dist

// A per-op memory timeline of one training step: after every dispatched op (views included), the
// bytes allocated on the device and the peak reached while the op ran, with the op's name and output
// shapes. Written as tab-separated lines: index, op, outputs, allocated MiB, peak-during-op MiB.
#pragma once
#include <cstdio>
#include <string>
#include <vector>

#include "core/dispatch.h"
#include "core/memory.h"
#include "core/shape.h"

namespace kiln::bench {

class MemoryTrace final : public DispatchObserver {
 public:
  MemoryTrace(Device device, std::FILE* out) : device_(device), out_(out) { reset_peak_memory(device_); }
  void on_op(const Primitive& op, const std::vector<Tensor>&, const std::vector<Tensor>& outputs) override {
    const MemoryUsage m = memory_usage(device_);
    std::string shapes;
    for (const Tensor& t : outputs) shapes += shape_str(t.shape());
    constexpr double kMiB = 1024.0 * 1024.0;
    std::fprintf(out_, "%zu\t%s\t%s\t%.1f\t%.1f\n", index_++, op.name(), shapes.c_str(),
                 static_cast<double>(m.allocated) / kMiB, static_cast<double>(m.peak) / kMiB);
    reset_peak_memory(device_);
  }

 private:
  Device device_;
  std::FILE* out_;
  size_t index_ = 0;
};

}  // namespace kiln::bench

// memory_usage, reset_peak_memory and free_memory per device type (see memory.h).
#include "core/memory.h"

#include <fstream>
#include <sstream>
#include <string>

#include "core/cuda/runtime.h"
#include "core/error.h"

namespace kiln {

MemoryUsage memory_usage(Device device) {
  if (device.is_cpu()) return cpu_memory_usage();
  const cuda::MemoryStats s = cuda::memory_stats(device.index);
  return {s.allocated, s.peak_allocated};
}

void reset_peak_memory(Device device) {
  if (device.is_cpu()) return reset_cpu_peak_memory();
  cuda::reset_peak_memory_stats(device.index);
}

size_t free_memory(Device device) {
  if (device.is_cuda()) {
    size_t free_bytes = 0, total_bytes = 0;
    cuda::memory_info(free_bytes, total_bytes, device.index);
    const cuda::MemoryStats s = cuda::memory_stats(device.index);
    return free_bytes + (s.reserved > s.allocated ? s.reserved - s.allocated : 0);
  }
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    size_t kib = 0;
    if (fields >> kib) return kib * 1024;
  }
  KILN_FAIL("memory", "cannot read MemAvailable from /proc/meminfo, so the free host memory is unknown");
}

}  // namespace kiln

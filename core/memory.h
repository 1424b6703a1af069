// Memory accounting for any device: the bytes kiln's allocator has handed out now and at its peak
// (the CPU allocator's counters, the CUDA caching allocator's statistics), and the bytes a device
// could still give (what a memory budget starts from).
#pragma once
#include <cstddef>

#include "core/device.h"
#include "core/storage.h"  // MemoryUsage

namespace kiln {

// Bytes in tensors' storages on `device` now, and the most there were since the last
// reset_peak_memory (CUDA: kiln's caching allocator's allocated and peak_allocated; the CPU: every
// thread's allocations through the CPU allocator). A CUDA device without a GPU is an error.
MemoryUsage memory_usage(Device device);
// Starts a new peak: peak = allocated now.
void reset_peak_memory(Device device);
// Bytes new allocations on `device` could still get: CUDA: the driver's free memory
// (cudaMemGetInfo) plus the blocks kiln's caching allocator holds unused; the CPU: MemAvailable
// from /proc/meminfo (an error where it cannot be read).
size_t free_memory(Device device);

}  // namespace kiln

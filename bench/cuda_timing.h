// Timing shared by the CUDA benchmarks: mean milliseconds per call of a function, measured with CUDA
// events on the current stream after a few warm-up calls.
#pragma once
#include <functional>

#include "core/cuda/runtime.h"

namespace kiln::bench {

inline double time_ms(const std::function<void()>& fn, int iters = 20, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  cuda::Event start(true), stop(true);
  start.record();
  for (int i = 0; i < iters; ++i) fn();
  stop.record();
  stop.synchronize();
  return static_cast<double>(start.elapsed_ms(stop)) / iters;
}

}  // namespace kiln::bench

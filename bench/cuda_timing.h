// Timing shared by the CUDA benchmarks: mean milliseconds per call of a function, measured with CUDA
// events on the current stream after a few warm-up calls; or the median single call (median_call_us).
#pragma once
#include <algorithm>
#include <functional>
#include <vector>

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

// The median of `iters` single calls in µs, each between its own events and waited for (launch cost
// included): the way ../shared/anchors times the peers' kernels (cuda_time_us), for side-by-side rows.
inline double median_call_us(const std::function<void()>& fn, int iters = 200, int warmup = 20) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> us;
  cuda::Event start(true), stop(true);
  for (int i = 0; i < iters; ++i) {
    start.record();
    fn();
    stop.record();
    stop.synchronize();
    us.push_back(static_cast<double>(start.elapsed_ms(stop)) * 1e3);
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace kiln::bench

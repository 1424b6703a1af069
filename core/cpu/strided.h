// Strided iteration for CPU kernels: visit every element of `shape` under N stride sets (operand 0
// is usually the output; broadcast operands have stride 0), in parallel, handing the innermost run to
// a callback: inner(offsets, count, inner_strides). Adjacent dims that are contiguous for every
// operand are merged first, so a contiguous tensor is a single run.
#pragma once
#include <array>
#include <cstdint>

#include "core/cpu/parallel.h"
#include "core/shape.h"
#include "core/tensor.h"

namespace kiln::cpu {

// Strides of `t` seen as a tensor of shape `target` (t broadcasts to target: missing/size-1 dims -> 0).
Shape broadcast_strides(const Tensor& t, const Shape& target);

template <size_t N>
struct StridedLoop {
  Shape shape;
  std::array<Shape, N> strides;

  StridedLoop(const Shape& s, const std::array<Shape, N>& st) {
    // drop size-1 dims, then merge dims contiguous for all operands
    for (size_t d = 0; d < s.size(); ++d) {
      if (s[d] == 1) continue;
      bool merge = !shape.empty();
      for (size_t k = 0; k < N && merge; ++k) merge = strides[k].back() == st[k][d] * s[d];
      if (merge) {
        shape.back() *= s[d];
        for (size_t k = 0; k < N; ++k) strides[k].back() = st[k][d];
      } else {
        shape.push_back(s[d]);
        for (size_t k = 0; k < N; ++k) strides[k].push_back(st[k][d]);
      }
    }
    if (shape.empty()) {
      shape.push_back(kiln::numel(s) == 0 ? 0 : 1);
      for (size_t k = 0; k < N; ++k) strides[k].push_back(0);
    }
  }

  // inner(const std::array<int64_t, N>& offsets, int64_t count, const std::array<int64_t, N>& inner_strides)
  template <class F>
  void run(F&& inner, int64_t grain = 32768) const {
    const int64_t nd = static_cast<int64_t>(shape.size());
    const int64_t inner_n = shape.back();
    const int64_t outer = inner_n == 0 ? 0 : kiln::numel(shape) / inner_n;
    std::array<int64_t, N> inner_st;
    for (size_t k = 0; k < N; ++k) inner_st[k] = strides[k].back();
    parallel_for(outer, std::max<int64_t>(1, grain / std::max<int64_t>(inner_n, 1)), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        std::array<int64_t, N> off{};
        int64_t rem = o;
        for (int64_t d = nd - 2; d >= 0; --d) {
          int64_t i = rem % shape[static_cast<size_t>(d)];
          rem /= shape[static_cast<size_t>(d)];
          for (size_t k = 0; k < N; ++k) off[k] += i * strides[k][static_cast<size_t>(d)];
        }
        inner(off, inner_n, inner_st);
      }
    });
  }
};

}  // namespace kiln::cpu

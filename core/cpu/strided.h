// Strided iteration for CPU kernels: visit every element of `shape` under N stride sets (operand 0
// is usually the output; broadcast operands have stride 0), in parallel, handing the innermost run to
// a callback: inner(offsets, count, inner_strides). Adjacent dims that are contiguous for every
// operand are merged first, so a contiguous tensor is a single run.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

#include "core/cpu/parallel.h"
#include "core/layout.h"
#include "core/shape.h"
#include "core/tensor.h"

namespace kiln::cpu {

template <size_t N>
struct StridedLoop {
  Shape shape;
  std::array<Shape, N> strides;

  StridedLoop(const Shape& s, const std::array<Shape, N>& st) : shape(s) {
    std::vector<Shape> all(st.begin(), st.end());
    coalesce_dims(shape, all);
    for (size_t k = 0; k < N; ++k) strides[k] = std::move(all[k]);
  }

  // inner(const std::array<int64_t, N>& offsets, int64_t count, const std::array<int64_t, N>& inner_strides)
  // Work is split over the flat element range, so one long contiguous run is shared by all threads too.
  template <class F>
  void run(F&& inner, int64_t grain = 32768) const {
    const size_t nd = shape.size();
    const int64_t inner_n = shape.back();
    const int64_t total = kiln::numel(shape);
    std::array<int64_t, N> inner_st;
    for (size_t k = 0; k < N; ++k) inner_st[k] = strides[k].back();
    parallel_for(total, grain, [&](int64_t b, int64_t e) {
      // multi-index of element b
      Shape idx(nd, 0);
      int64_t rem = b;
      for (size_t d = nd; d-- > 0;) {
        idx[d] = rem % shape[d];
        rem /= shape[d];
      }
      std::array<int64_t, N> off{};
      for (size_t d = 0; d < nd; ++d)
        for (size_t k = 0; k < N; ++k) off[k] += idx[d] * strides[k][d];
      int64_t pos = b;
      while (pos < e) {
        int64_t count = std::min(inner_n - idx[nd - 1], e - pos);
        inner(off, count, inner_st);
        pos += count;
        if (pos >= e) break;
        // step to the start of the next row: reset the last dim, carry into the outer ones
        for (size_t k = 0; k < N; ++k) off[k] -= idx[nd - 1] * strides[k][nd - 1];
        idx[nd - 1] = 0;
        for (size_t d = nd - 1; d-- > 0;) {
          ++idx[d];
          for (size_t k = 0; k < N; ++k) off[k] += strides[k][d];
          if (idx[d] < shape[d]) break;
          for (size_t k = 0; k < N; ++k) off[k] -= idx[d] * strides[k][d];
          idx[d] = 0;
        }
      }
    });
  }
};

}  // namespace kiln::cpu

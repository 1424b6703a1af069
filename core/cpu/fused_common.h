// Helpers shared by the CPU kernels of the fused ops (indexing, norm, rope, loss, attention,
// activation): element conversion to the compute type, a dtype visitor that accepts only floats,
// gathering any strided view into a contiguous buffer, row offsets, and parallel grain sizes.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/cpu/strided.h"
#include "core/tensor.h"

namespace kiln::cpu::fused {

// A stored element read as the compute type C (bf16/f16 go through float).
template <class C, class T> inline C load(T v) { return static_cast<C>(static_cast<compute_t<T>>(v)); }

// A compute-type value rounded to the stored type T.
template <class T, class C> inline T store(C v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(v);
  } else {
    return T(static_cast<float>(v));
  }
}

// Calls fn(type_tag<T>{}) for a float dtype; any other dtype is an error of `op`.
template <class Fn> void visit_float(DType d, const char* op, Fn&& fn) {
  switch (d) {
    case DType::f64: fn(type_tag<double>{}); return;
    case DType::f32: fn(type_tag<float>{}); return;
    case DType::bf16: fn(type_tag<bf16>{}); return;
    case DType::f16: fn(type_tag<f16>{}); return;
    default: KILN_FAIL(op, "expected a float tensor, found {}", dtype_name(d));
  }
}

// The elements of `t`'s data seen with `shape` and `strides` (a view of it, e.g. with two dims
// swapped), as C in row-major order of `shape`. `t` may have any float dtype.
template <class C> std::vector<C> gather(const Tensor& t, const Shape& shape, const Shape& strides, const char* op) {
  std::vector<C> out(static_cast<size_t>(kiln::numel(shape)));
  if (out.empty()) return out;
  visit_float(t.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(t.raw_data());
    C* dst = out.data();
    StridedLoop<2> loop(shape, {contiguous_strides(shape), strides});
    loop.run([&](const std::array<int64_t, 2>& off, int64_t n, const std::array<int64_t, 2>& st) {
      for (int64_t i = 0; i < n; ++i) dst[off[0] + i * st[0]] = load<C>(src[off[1] + i * st[1]]);
    });
  });
  return out;
}

// Every element of `t` (any float dtype, any strides) as C, in row-major order of t's shape.
template <class C> std::vector<C> gather(const Tensor& t, const char* op) {
  return gather<C>(t, t.shape(), t.strides(), op);
}

// A 4-d tensor (A, B, X, Y) gathered as (A, B, Y, X).
template <class C> std::vector<C> gather_transposed(const Tensor& t, const char* op) {
  const Shape& s = t.shape();
  const Shape& st = t.strides();
  return gather<C>(t, {s[0], s[1], s[3], s[2]}, {st[0], st[1], st[3], st[2]}, op);
}

// Every element of an i64/i32 tensor (any strides) as int64, in row-major order.
inline std::vector<int64_t> gather_index(const Tensor& t, const char* op) {
  KILN_CHECK(t.dtype() == DType::i64 || t.dtype() == DType::i32, op, "expected i64 or i32 indices, found {}",
             dtype_name(t.dtype()));
  std::vector<int64_t> out(static_cast<size_t>(t.numel()));
  if (out.empty()) return out;
  auto copy = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(t.raw_data());
    StridedLoop<2> loop(t.shape(), {contiguous_strides(t.shape()), t.strides()});
    loop.run([&](const std::array<int64_t, 2>& off, int64_t n, const std::array<int64_t, 2>& st) {
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(off[0] + i * st[0])] = src[off[1] + i * st[1]];
    });
  };
  if (t.dtype() == DType::i64) copy(type_tag<int64_t>{});
  else copy(type_tag<int32_t>{});
  return out;
}

// Element offsets of the start of every row of a tensor whose leading dims are `shape` with
// `strides` (the last dim excluded), in row-major order.
inline std::vector<int64_t> row_offsets(const Shape& shape, const Shape& strides) {
  const int64_t n = kiln::numel(shape);
  std::vector<int64_t> out(static_cast<size_t>(n));
  Shape idx(shape.size(), 0);
  int64_t off = 0;
  for (int64_t r = 0; r < n; ++r) {
    out[static_cast<size_t>(r)] = off;
    for (size_t d = shape.size(); d-- > 0;) {
      off += strides[d];
      if (++idx[d] < shape[d]) break;
      off -= strides[d] * shape[d];
      idx[d] = 0;
    }
  }
  return out;
}

// row_offsets for the leading dims of `t` (all but the last).
inline std::vector<int64_t> row_offsets(const Tensor& t) {
  Shape shape(t.shape().begin(), t.shape().end() - 1);
  Shape strides(t.strides().begin(), t.strides().end() - 1);
  return row_offsets(shape, strides);
}

// Work items per parallel_for chunk so that a chunk holds roughly `target` elements of work.
inline int64_t grain_for(int64_t work_per_item, int64_t target = 16384) {
  return std::max<int64_t>(1, target / std::max<int64_t>(work_per_item, 1));
}

template <class C> inline C dot(const C* a, const C* b, int64_t n) {
  C acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// y += a * x
template <class C> inline void axpy(C* y, C a, const C* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace kiln::cpu::fused

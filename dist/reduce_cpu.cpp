// Blocked reduction loops: each block of elements is read from every source into an accumulator of
// the compute type, then written to every destination.
#include "dist/reduce_cpu.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"

namespace kiln::dist {
namespace {

template <class T, class C>
void reduce_typed(ReduceOp op, const std::vector<const void*>& srcs, const std::vector<void*>& dsts, int64_t count) {
  constexpr int64_t kBlock = 2048;
  C acc[kBlock];
  for (int64_t begin = 0; begin < count; begin += kBlock) {
    const int64_t n = std::min(kBlock, count - begin);
    const T* first = static_cast<const T*>(srcs[0]) + begin;
    for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<C>(first[i]);
    for (size_t s = 1; s < srcs.size(); ++s) {
      const T* src = static_cast<const T*>(srcs[s]) + begin;
      if (op == ReduceOp::sum) {
        for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<C>(src[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          C v = static_cast<C>(src[i]);
          if constexpr (std::is_floating_point_v<C>) {
            if (std::isnan(v) || (!std::isnan(acc[i]) && v > acc[i])) acc[i] = v;
          } else {
            if (v > acc[i]) acc[i] = v;
          }
        }
      }
    }
    for (void* d : dsts) {
      T* dst = static_cast<T*>(d) + begin;
      for (int64_t i = 0; i < n; ++i) dst[i] = T(acc[i]);
    }
  }
}

}  // namespace

void reduce_cpu(DType dtype, ReduceOp op, const std::vector<const void*>& srcs, const std::vector<void*>& dsts,
                int64_t count) {
  KILN_CHECK(!srcs.empty(), "dist reduce", "expected at least one source");
  switch (dtype) {
    case DType::f32: return reduce_typed<float, float>(op, srcs, dsts, count);
    case DType::bf16: return reduce_typed<bf16, float>(op, srcs, dsts, count);
    case DType::f64: return reduce_typed<double, double>(op, srcs, dsts, count);
    case DType::i64: return reduce_typed<int64_t, int64_t>(op, srcs, dsts, count);
    default: KILN_FAIL("dist reduce", "expected f32, bf16, f64 or i64, found {}", dtype_name(dtype));
  }
}

}  // namespace kiln::dist

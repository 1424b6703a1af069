// Strided<N> descriptors from tensors, and the current stream of a tensor's device.
#include "core/cuda/tensor_args.h"

#include "core/cuda/runtime.h"
#include "core/layout.h"

namespace kiln::cuda {

template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<Shape, N>& strides, const char* op) {
  Shape s = shape;
  std::vector<Shape> st(strides.begin(), strides.end());
  coalesce_dims(s, st);
  KILN_CHECK(static_cast<int>(s.size()) <= kMaxDims, op, "needs more than {} dims after merging ({}); make the inputs contiguous",
             kMaxDims, shape_str(s));
  Strided<N> out;
  out.ndim = static_cast<int>(s.size());
  for (size_t d = 0; d < s.size(); ++d) {
    out.shape[d] = s[d];
    for (int k = 0; k < N; ++k) out.strides[k][d] = st[static_cast<size_t>(k)][d];
  }
  return out;
}

template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<const Tensor*, N>& operands, const char* op) {
  std::array<Shape, N> strides;
  for (int k = 0; k < N; ++k) strides[static_cast<size_t>(k)] = broadcast_strides(*operands[static_cast<size_t>(k)], shape);
  return make_strided<N>(shape, strides, op);
}

#define KILN_MAKE_STRIDED(N)                                                                      \
  template Strided<N> make_strided<N>(const Shape&, const std::array<const Tensor*, N>&, const char*); \
  template Strided<N> make_strided<N>(const Shape&, const std::array<Shape, N>&, const char*);
KILN_MAKE_STRIDED(1)
KILN_MAKE_STRIDED(2)
KILN_MAKE_STRIDED(3)
KILN_MAKE_STRIDED(4)
KILN_MAKE_STRIDED(5)
#undef KILN_MAKE_STRIDED

void* stream_of(const Tensor& t) { return current_stream(t.device().index).handle(); }

}  // namespace kiln::cuda

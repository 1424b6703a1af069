// Strided<N> descriptors from tensors, and the current stream of a tensor's device.
#include "core/cuda/tensor_args.h"

#include "core/cuda/runtime.h"
#include "core/layout.h"

namespace kiln::cuda {

template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<const Tensor*, N>& operands, const char* op) {
  Shape s = shape;
  std::vector<Shape> strides;
  for (const Tensor* t : operands) strides.push_back(broadcast_strides(*t, shape));
  coalesce_dims(s, strides);
  KILN_CHECK(static_cast<int>(s.size()) <= kMaxDims, op, "needs more than {} dims after merging ({}); make the inputs contiguous",
             kMaxDims, shape_str(s));
  Strided<N> out;
  out.ndim = static_cast<int>(s.size());
  for (size_t d = 0; d < s.size(); ++d) {
    out.shape[d] = s[d];
    for (int k = 0; k < N; ++k) out.strides[k][d] = strides[static_cast<size_t>(k)][d];
  }
  return out;
}

template Strided<1> make_strided<1>(const Shape&, const std::array<const Tensor*, 1>&, const char*);
template Strided<2> make_strided<2>(const Shape&, const std::array<const Tensor*, 2>&, const char*);
template Strided<3> make_strided<3>(const Shape&, const std::array<const Tensor*, 3>&, const char*);
template Strided<4> make_strided<4>(const Shape&, const std::array<const Tensor*, 4>&, const char*);

void* stream_of(const Tensor& t) { return current_stream(t.device().index).handle(); }

}  // namespace kiln::cuda

// Host side of the rotary-embedding kernel (core/cuda/rope.cu): broadcasts cos/sin against x's rows,
// builds the row descriptors, launches on the device's current stream and registers the kernel.
#include <cuda_runtime_api.h>

#include "core/cuda/check.h"
#include "core/cuda/rope.cuh"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/layout.h"
#include "core/ops/rope.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

void rotary_kernel(const prim::RotaryEmbedding& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &cos = in[1], &sin = in[2];  // (..., T, D), (..., T, D/2) x2
  const int64_t h = x.size(-1) / 2, r = h == 0 ? 0 : x.numel() / (2 * h);
  if (r == 0) return;
  DeviceGuard guard(x.device().index);
  Shape half = x.shape();
  half.back() = h;
  const Shape cst = broadcast_strides(cos, half), sst = broadcast_strides(sin, half);
  const Strided<3> rows = make_strided<3>(lead_of(half), {lead_of(x.strides()), lead_of(cst), lead_of(sst)}, p.name());
  KILN_CUDA_CHECK(launch_rotary(x.dtype(), cos.dtype(), x.raw_data(), cos.raw_data(), sin.raw_data(), rows,
                                x.strides().back(), cst.back(), sst.back(), r, h, out[0].raw_data(), stream_of(out[0])),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_rope_kernels) {
  register_kernel<prim::RotaryEmbedding>(DeviceType::cuda, &rotary_kernel);
}

}  // namespace kiln::cuda

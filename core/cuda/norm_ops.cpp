// Host side of the RMSNorm kernels (core/cuda/norm.cu): unpacks tensors into row descriptors,
// allocates the backward's dw partials from kiln's allocator, launches on the device's current stream
// and registers the kernels.
#include <cuda_runtime_api.h>

#include "core/cuda/check.h"
#include "core/cuda/norm.cuh"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/norm.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

void rms_norm_kernel(const prim::RmsNorm& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1];  // (..., D), (D)
  const int64_t d = x.size(-1), r = d == 0 ? 0 : x.numel() / d;
  if (r == 0) return;
  DeviceGuard guard(x.device().index);
  const Strided<1> rows = make_strided<1>(lead_of(x.shape()), {lead_of(x.strides())}, p.name());
  KILN_CUDA_CHECK(launch_rms_norm(x.dtype(), x.raw_data(), rows, x.strides().back(), w.raw_data(), w.strides()[0], r, d,
                                  p.eps(), out[0].raw_data(), stream_of(out[0])),
                  p.name());
}

void rms_norm_backward_kernel(const prim::RmsNormBackward& p, const std::vector<Tensor>& in,
                              std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1], &g = in[2];  // (..., D), (D), (..., D)
  const int64_t d = x.size(-1), r = d == 0 ? 0 : x.numel() / d;
  if (d == 0) return;
  DeviceGuard guard(x.device().index);
  const Strided<2> rows = make_strided<2>(lead_of(x.shape()), {lead_of(x.strides()), lead_of(g.strides())}, p.name());
  const size_t bytes = rms_norm_backward_workspace(x.dtype(), r, d);
  Tensor partial = empty({static_cast<int64_t>(bytes)}, DType::u8, x.device());  // (blocks, D) f32/f64
  const Tensor addend = in.size() > 3 ? in[3].contiguous() : Tensor();  // (R, D) or none: the kernel reads rows of d
  KILN_CUDA_CHECK(launch_rms_norm_backward(x.dtype(), x.raw_data(), g.raw_data(), rows, x.strides().back(),
                                           g.strides().back(), w.raw_data(), w.strides()[0], r, d, p.eps(),
                                           addend.defined() ? addend.raw_data() : nullptr, out[0].raw_data(),
                                           out[1].raw_data(), partial.raw_data(), stream_of(out[0])),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_norm_kernels) {
  register_kernel<prim::RmsNorm>(DeviceType::cuda, &rms_norm_kernel);
  register_kernel<prim::RmsNormBackward>(DeviceType::cuda, &rms_norm_backward_kernel);
}

}  // namespace kiln::cuda

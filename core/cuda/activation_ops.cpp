// Host side of the SwiGLU kernels (core/cuda/activation.cu): picks the contiguous or strided path,
// launches on the device's current stream and registers the kernels.
#include <cuda_runtime_api.h>

#include "core/cuda/activation.cuh"
#include "core/cuda/check.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/activation.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

void swiglu_kernel(const prim::SwiGlu& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1];
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  if (gate.is_contiguous() && up.is_contiguous()) {
    KILN_CUDA_CHECK(launch_swiglu(y.dtype(), gate.raw_data(), up.raw_data(), y.raw_data(), y.numel(), nullptr,
                                  stream_of(y)),
                    p.name());
    return;
  }
  const Strided<3> st = make_strided<3>(y.shape(), {&y, &gate, &up}, p.name());
  KILN_CUDA_CHECK(launch_swiglu(y.dtype(), gate.raw_data(), up.raw_data(), y.raw_data(), y.numel(), &st, stream_of(y)),
                  p.name());
}

void swiglu_backward_kernel(const prim::SwiGluBackward& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1], &g = in[2];
  Tensor &dgate = out[0], &dup = out[1];
  if (dgate.numel() == 0) return;
  DeviceGuard guard(dgate.device().index);
  const bool contiguous = gate.is_contiguous() && up.is_contiguous() && g.is_contiguous();
  Strided<5> st;
  if (!contiguous) {
    const Shape dense = contiguous_strides(dgate.shape());
    st = make_strided<5>(dgate.shape(), {dense, dense, gate.strides(), up.strides(), g.strides()}, p.name());
  }
  KILN_CUDA_CHECK(launch_swiglu_backward(dgate.dtype(), gate.raw_data(), up.raw_data(), g.raw_data(), dgate.raw_data(),
                                         dup.raw_data(), dgate.numel(), contiguous ? nullptr : &st, stream_of(dgate)),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_activation_kernels) {
  register_kernel<prim::SwiGlu>(DeviceType::cuda, &swiglu_kernel);
  register_kernel<prim::SwiGluBackward>(DeviceType::cuda, &swiglu_backward_kernel);
}

}  // namespace kiln::cuda

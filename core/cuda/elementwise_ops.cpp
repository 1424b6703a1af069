// Host side of the CUDA elementwise kernels: unpacks Unary/Binary/Where tensors into device pointers
// and Strided descriptors (output first), launches on the device's current stream, and registers the
// kernels with the dispatcher.
#include <array>

#include "core/cuda/check.h"
#include "core/cuda/elementwise.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/elementwise.h"

namespace kiln::cuda {
namespace {

void unary_kernel(const prim::Unary& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  const Strided<2> st = make_strided<2>(y.shape(), {&y, &in[0]}, p.name());
  KILN_CUDA_CHECK(launch_unary(p.op(), in[0].dtype(), y.raw_data(), in[0].raw_data(), st, y.numel(), stream_of(y)),
                  p.name());
}

void binary_kernel(const prim::Binary& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  const Strided<3> st = make_strided<3>(y.shape(), {&y, &in[0], &in[1]}, p.name());
  KILN_CUDA_CHECK(launch_binary(p.op(), in[0].dtype(), y.raw_data(), in[0].raw_data(), in[1].raw_data(), st,
                                y.numel(), stream_of(y)),
                  p.name());
}

void where_kernel(const prim::Where& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  const Strided<4> st = make_strided<4>(y.shape(), {&y, &in[0], &in[1], &in[2]}, p.name());
  KILN_CUDA_CHECK(launch_where(y.dtype(), y.raw_data(), in[0].raw_data(), in[1].raw_data(), in[2].raw_data(), st,
                               y.numel(), stream_of(y)),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_elementwise_kernels) {
  register_kernel<prim::Unary>(DeviceType::cuda, &unary_kernel);
  register_kernel<prim::Binary>(DeviceType::cuda, &binary_kernel);
  register_kernel<prim::Where>(DeviceType::cuda, &where_kernel);
}

}  // namespace kiln::cuda

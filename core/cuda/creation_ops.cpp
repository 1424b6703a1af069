// CUDA kernels of prim::Arange, prim::Random (uniform, normal, integer, keep_mask) and prim::Dropout:
// Philox numbers bit-identical to the CPU kernels (normal within an ulp of double math).
#include "core/cuda/check.h"
#include "core/cuda/creation.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/creation.h"

namespace kiln::cuda {
namespace {

void arange_kernel(const prim::Arange& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const Tensor& o = out[0];  // (n,)
  DeviceGuard guard(o.device().index);
  KILN_CUDA_CHECK(launch_arange(o.raw_data(), o.dtype(), op.start(), op.step(), o.numel(), stream_of(o)), "arange");
}

RandomFill fill_of(prim::RandomKind k) {
  switch (k) {
    case prim::RandomKind::uniform: return RandomFill::uniform;
    case prim::RandomKind::normal: return RandomFill::normal;
    case prim::RandomKind::integer: return RandomFill::integer;
    case prim::RandomKind::keep_mask: return RandomFill::keep_mask;
  }
  return RandomFill::uniform;
}

void random_kernel(const prim::Random& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const Tensor& o = out[0];  // contiguous, op's shape
  DeviceGuard guard(o.device().index);
  KILN_CUDA_CHECK(launch_random(o.raw_data(), o.dtype(), fill_of(op.kind()), o.numel(), op.seed(), op.offset(), op.low(),
                                op.high(), op.p(), stream_of(o)),
                  "random");
}

void dropout_kernel(const prim::Dropout& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];   // any layout
  const Tensor& o = out[0];  // contiguous, x's shape
  if (o.numel() == 0) return;
  DeviceGuard guard(o.device().index);
  const double p = op.p();
  // The CPU's scale: 1 / (1 - p) rounded to the compute type (float, or double for f64).
  const double scale = p >= 1.0 ? 0.0
                       : x.dtype() == DType::f64 ? 1.0 / (1.0 - p)
                                                 : static_cast<double>(static_cast<float>(1.0 / (1.0 - p)));
  const Strided<1> st = make_strided<1>(x.shape(), {&x}, "dropout");
  KILN_CUDA_CHECK(launch_dropout(o.raw_data(), x.raw_data(), x.dtype(), st, o.numel(), p, scale, op.seed(), op.offset(),
                                 stream_of(o)),
                  "dropout");
}

}  // namespace

KILN_REGISTER(cuda_creation_kernels) {
  register_kernel<prim::Arange>(DeviceType::cuda, &arange_kernel);
  register_kernel<prim::Random>(DeviceType::cuda, &random_kernel);
  register_kernel<prim::Dropout>(DeviceType::cuda, &dropout_kernel);
}

}  // namespace kiln::cuda

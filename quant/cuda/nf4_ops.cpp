// Host side of the NF4 CUDA kernels (quant/cuda/nf4.cu): unpacks the primitives' tensors, launches on
// the device's current stream and registers the kernels through KILN_REGISTER (core/ never knows quant/).
#include <cuda_runtime_api.h>

#include "core/cuda/check.h"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "quant/cuda/nf4.cuh"
#include "quant/nf4.h"

namespace kiln::quant {
namespace {

void nf4_quantize_cuda(const prim::NF4Quantize& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& w = in[0];
  kiln::cuda::DeviceGuard guard(w.device().index);
  KILN_CUDA_CHECK(cuda::launch_nf4_quantize(w.dtype(), w.raw_data(), w.numel(), op.blocksize(),
                                            out[0].data_ptr<uint8_t>(), out[1].data_ptr<float>(), kiln::cuda::stream_of(w)),
                  op.name());
}

void blockwise8_quantize_cuda(const prim::Blockwise8bitQuantize& op, const std::vector<Tensor>& in,
                              std::vector<Tensor>& out) {
  kiln::cuda::DeviceGuard guard(in[0].device().index);
  KILN_CUDA_CHECK(cuda::launch_blockwise8_quantize(in[0].data_ptr<float>(), in[0].numel(), op.offset(),
                                                   in[1].data_ptr<float>(), op.blocksize(), out[0].data_ptr<uint8_t>(),
                                                   out[1].data_ptr<float>(), kiln::cuda::stream_of(in[0])),
                  op.name());
}

void blockwise8_dequantize_cuda(const prim::Blockwise8bitDequantize& op, const std::vector<Tensor>& in,
                                std::vector<Tensor>& out) {
  kiln::cuda::DeviceGuard guard(in[0].device().index);
  KILN_CUDA_CHECK(cuda::launch_blockwise8_dequantize(in[0].data_ptr<uint8_t>(), in[1].data_ptr<float>(),
                                                     in[2].data_ptr<float>(), in[0].numel(), op.blocksize(),
                                                     out[0].data_ptr<float>(), kiln::cuda::stream_of(in[0])),
                  op.name());
}

void nf4_dequantize_cuda(const prim::NF4Dequantize& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  kiln::cuda::DeviceGuard guard(in[0].device().index);
  cuda::NF4Scales s;
  s.blocksize = op.blocksize();
  s.nested_blocksize = op.nested_blocksize();
  s.offset = op.offset();
  if (op.double_quant()) {
    s.absmax_u8 = in[1].data_ptr<uint8_t>();
    s.nested_absmax = in[2].data_ptr<float>();
    s.nested_code = in[3].data_ptr<float>();
  } else {
    s.absmax_f32 = in[1].data_ptr<float>();
  }
  KILN_CUDA_CHECK(cuda::launch_nf4_dequantize(op.out_dtype(), in[0].data_ptr<uint8_t>(), s, out[0].numel(),
                                              out[0].raw_data(), kiln::cuda::stream_of(in[0])),
                  op.name());
}

}  // namespace

KILN_REGISTER(cuda_nf4_kernels) {
  register_kernel<prim::NF4Quantize>(DeviceType::cuda, &nf4_quantize_cuda);
  register_kernel<prim::Blockwise8bitQuantize>(DeviceType::cuda, &blockwise8_quantize_cuda);
  register_kernel<prim::Blockwise8bitDequantize>(DeviceType::cuda, &blockwise8_dequantize_cuda);
  register_kernel<prim::NF4Dequantize>(DeviceType::cuda, &nf4_dequantize_cuda);
}

}  // namespace kiln::quant

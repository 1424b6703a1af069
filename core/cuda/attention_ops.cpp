// CUDA kernels of prim::ScaledDotProductAttention and prim::SdpaBackward: cuDNN's fused SDPA where it
// takes the call (bf16/f16; see sdpa_cudnn.h), else kiln's flash kernel (attention.cu); the
// KILN_SDPA_BACKEND switch forces either. Both read and write every operand through its strides, so
// heads_last operands are (B, H, T, D) views (prim::sdpa_heads_view) of the (B, T, H, D) tensors.
#include <cuda_runtime_api.h>

#include "core/cuda/attention.cuh"
#include "core/cuda/check.h"
#include "core/cuda/runtime.h"
#include "core/registry.h"
#include "core/cuda/sdpa_cudnn.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"

namespace kiln::cuda {
namespace {

AttnOperand operand(const Tensor& t) {
  AttnOperand o;
  o.data = t.raw_data();
  for (size_t d = 0; d < 4; ++d) o.stride[d] = t.strides()[d];
  return o;
}

AttnDims dims_of(const Tensor& q, const Tensor& v, bool causal, double scale) {
  AttnDims d;
  d.b = q.size(0);
  d.hq = q.size(1);
  d.t = q.size(2);
  d.d = q.size(3);
  d.hkv = v.size(1);
  d.s = v.size(2);
  d.dv = v.size(3);
  d.causal = causal;
  d.scale = scale;
  return d;
}

// A (B, H, T) float tensor as a contiguous tensor of dtype `to` (f32/f64); with `nonzero`, also sets
// that device int to whether any element is nonzero.
Tensor pack_rows(const Tensor& x, DType to, int* nonzero, const char* op) {
  Tensor dst = empty(x.shape(), to, x.device());
  const int64_t shape[3] = {x.size(0), x.size(1), x.size(2)};
  const int64_t strides[3] = {x.strides()[0], x.strides()[1], x.strides()[2]};
  KILN_CUDA_CHECK(launch_pack_rows(x.dtype(), x.raw_data(), shape, strides, to, dst.raw_data(), nonzero, stream_of(x)), op);
  return dst;
}

// heads_last operands (B, T, H, D) as the (B, H, T, D) views every kernel here takes.
Tensor heads(const Tensor& t, bool heads_last) { return heads_last ? prim::sdpa_heads_view(t) : t; }

std::string describe(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  return fmt::format("{} q {}, k {}, v {}, causal={}", dtype_name(q.dtype()), shape_str(q.shape()), shape_str(k.shape()),
                     shape_str(v.shape()), causal);
}

void sdpa_forward_cuda(const prim::ScaledDotProductAttention& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const bool hl = p.heads_last();
  const Tensor q = heads(in[0], hl), k = heads(in[1], hl), v = heads(in[2], hl);  // (B, H, T, D) views
  Tensor o = heads(out[0], hl);                                                    // (B, Hq, T, Dv)
  DeviceGuard guard(q.device().index);
  const SdpaBackend backend = sdpa_backend();
  if (backend != SdpaBackend::flash) {
    if (cudnn_sdpa_forward(p, q, k, v, o, out[1])) {
      set_last_sdpa_path("cudnn");
      return;
    }
    KILN_CHECK(backend != SdpaBackend::cudnn, p.name(), "cuDNN cannot run this attention ({}) and KILN_SDPA_BACKEND=cudnn",
               describe(q, k, v, p.causal()));
  }
  KILN_CUDA_CHECK(launch_flash_forward(q.dtype(), dims_of(q, v, p.causal(), p.scale()), operand(q), operand(k),
                                       operand(v), operand(o), out[1].raw_data(), stream_of(q)),
                  p.name());
  set_last_sdpa_path("flash");
}

// cuDNN's backward has no lse-gradient input. dlse is zeros in ordinary training (nothing reads
// lse downstream), but checking that on the host would stall the stream, so: a kernel packs dlse
// and sets a device flag when some element is nonzero; cuDNN runs; then the flash backward runs
// gated on the flag — it returns at once when dlse is zero (a few microseconds of launches) and
// otherwise overwrites dq, dk, dv with the exact gradients.
void sdpa_backward_cuda(const prim::SdpaBackward& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const bool hl = p.heads_last();
  // (B, H, T, D) views of the heads_last operands; lse, dlse (B, Hq, T) either way
  const Tensor q = heads(in[0], hl), k = heads(in[1], hl), v = heads(in[2], hl), o = heads(in[3], hl);
  const Tensor dout = heads(in[5], hl);
  const Tensor &lse = in[4], &dlse = in[6];
  Tensor dq = heads(out[0], hl), dk = heads(out[1], hl), dv = heads(out[2], hl);
  DeviceGuard guard(q.device().index);
  const DType ct = compute_dtype(q.dtype());
  Tensor flag = empty({1}, DType::i32, q.device());
  int* flag_ptr = static_cast<int*>(flag.raw_data());
  const Tensor lse_c = lse.dtype() == ct && lse.is_contiguous() ? lse : pack_rows(lse, ct, nullptr, p.name());
  const Tensor dlse_c = pack_rows(dlse, ct, flag_ptr, p.name());
  const int* gate = nullptr;
  const SdpaBackend backend = sdpa_backend();
  bool ran_cudnn = false;
  if (backend != SdpaBackend::flash) {
    ran_cudnn = cudnn_sdpa_backward(p, q, k, v, o, dout, lse_c, dq, dk, dv);
    KILN_CHECK(ran_cudnn || backend != SdpaBackend::cudnn, p.name(),
               "cuDNN cannot run this attention backward ({}) and KILN_SDPA_BACKEND=cudnn", describe(q, k, v, p.causal()));
    if (ran_cudnn) gate = flag_ptr;
  }
  Tensor delta = empty(lse.shape(), ct, q.device());  // (B, Hq, T)
  KILN_CUDA_CHECK(launch_flash_backward(q.dtype(), dims_of(q, v, p.causal(), p.scale()), operand(q), operand(k),
                                        operand(v), operand(o), operand(dout), lse_c.raw_data(), dlse_c.raw_data(),
                                        delta.raw_data(), operand(dq), operand(dk), operand(dv), gate, stream_of(q)),
                  p.name());
  set_last_sdpa_path(ran_cudnn ? "cudnn" : "flash");
}

}  // namespace

KILN_REGISTER(cuda_attention_kernels) {
  register_kernel<prim::ScaledDotProductAttention>(DeviceType::cuda, &sdpa_forward_cuda);
  register_kernel<prim::SdpaBackward>(DeviceType::cuda, &sdpa_backward_cuda);
}

}  // namespace kiln::cuda

// Launchers of kiln's own flash-attention kernels (CUDA cores, every float dtype, any head dims and
// strides): the fallback where cuDNN's fused SDPA cannot run, plus the small helpers both paths use
// (packing rows of lse/dlse, contiguous copies). fmt-free and Tensor-free: raw pointers and strides.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// A 4-d operand (B, H, L, D) by its data pointer and element strides.
struct AttnOperand {
  const void* data = nullptr;
  int64_t stride[4] = {};
};

// Sizes of one attention call: q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv).
struct AttnDims {
  int64_t b = 0, hq = 0, hkv = 0, t = 0, s = 0, d = 0, dv = 0;
  bool causal = false;  // query i sees key j when j <= i + S - T (aligned bottom-right)
  double scale = 1.0;
};

// out (B, Hq, T, Dv) in `dtype`, any strides (written through them); lse (B, Hq, T) contiguous in the
// compute type (f64 for f64, f32 otherwise). Rows that see no key get zeros and lse = -inf.
cudaError_t launch_flash_forward(DType dtype, const AttnDims& dims, const AttnOperand& q, const AttnOperand& k,
                                 const AttnOperand& v, const AttnOperand& out, void* lse, void* stream);

// dq (B, Hq, T, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv) in `dtype`, any strides, from the
// forward's out and lse, dout and dlse (lse and dlse contiguous (B, Hq, T) in the compute type).
// `delta` is scratch of B*Hq*T compute-type elements. Deterministic: every output element is
// written by one thread, summing in a fixed order. With `gate` non-null, every kernel first reads
// *gate and does nothing when it is 0 (the cuDNN path runs this to overwrite its result when dlse
// turns out nonzero, without a host synchronisation).
cudaError_t launch_flash_backward(DType dtype, const AttnDims& dims, const AttnOperand& q, const AttnOperand& k,
                                  const AttnOperand& v, const AttnOperand& out, const AttnOperand& dout,
                                  const void* lse, const void* dlse, void* delta, const AttnOperand& dq,
                                  const AttnOperand& dk, const AttnOperand& dv, const int* gate, void* stream);

// dst (n0 * n1 * n2) contiguous in `dst_dtype` (f32 or f64) from a strided (n0, n1, n2) float
// tensor; with `nonzero` non-null, sets *nonzero to 1 when some element is nonzero (it is zeroed
// here first).
cudaError_t launch_pack_rows(DType src_dtype, const void* src, const int64_t (&shape)[3], const int64_t (&strides)[3],
                             DType dst_dtype, void* dst, int* nonzero, void* stream);

// Contiguous copy of a strided tensor of 2-, 4- or 8-byte elements (operand 0 of `st` is the
// destination, operand 1 the source; make_strided builds it).
cudaError_t launch_attn_contiguous(int64_t numel, int elem_size, const Strided<2>& st, void* dst, const void* src,
                                   void* stream);

}  // namespace kiln::cuda

// Launchers of the NF4 kernels (quant/cuda/nf4.cu): NF4 quantise, 8-bit blockwise quantise and
// dequantise (double quantisation of the absmax), and the one-kernel NF4 dequantise. fmt-free and
// Tensor-free: contiguous device pointers, element counts and a cudaStream_t passed as void*.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::quant::cuda {

// w (n) f32/bf16/f16 -> packed u8 (ceil(n/2)), absmax f32 (ceil(n/blocksize)); blocksize a power of
// two in [64, 4096]. Reproduces bnb's CUDA kernel (approximate reciprocal, flush-to-zero).
cudaError_t launch_nf4_quantize(DType dt, const void* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                                void* stream);

// x (n) f32 -> codes u8 (n), absmax f32 (ceil(n/blocksize)): x - offset quantised against code (256).
cudaError_t launch_blockwise8_quantize(const float* x, int64_t n, float offset, const float* code, int64_t blocksize,
                                       uint8_t* codes, float* absmax, void* stream);

// out[i] = code[codes[i]] * absmax[i / blocksize] (f32).
cudaError_t launch_blockwise8_dequantize(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                                         int64_t blocksize, float* out, void* stream);

// Where each NF4 block's scale comes from: f32 absmax, or 8-bit codes + nested scales + offset.
struct NF4Scales {
  const float* absmax_f32 = nullptr;      // single quantisation (nblocks)
  const uint8_t* absmax_u8 = nullptr;     // double quantisation (nblocks)
  const float* nested_absmax = nullptr;   // (ceil(nblocks / nested_blocksize))
  const float* nested_code = nullptr;     // (256)
  float offset = 0.0f;
  int64_t blocksize = 64;
  int64_t nested_blocksize = 256;
};

// packed (ceil(n/2)) -> out (n) of dtype `out_dt` (bf16/f16/f32), one kernel.
cudaError_t launch_nf4_dequantize(DType out_dt, const uint8_t* packed, const NF4Scales& scales, int64_t n, void* out,
                                  void* stream);

}  // namespace kiln::quant::cuda

// Internal cuBLASLt entry points beyond prim::Matmul (core/cuda/matmul_ops.cpp): a GEMM with the
// bias added in cuBLASLt's epilogue (for nn::Linear) and the TF32 switch for f32 products.
#pragma once
#include "core/tensor.h"

namespace kiln::cuda {

// a (..., M, K) @ b (K, N) + bias (N) -> (..., M, N) on one CUDA device, one float dtype for all
// three; b may be a transposed view (x @ W^T with W (N, K)). The bias is added by cuBLASLt's
// epilogue (no extra pass). Records no autograd history: for inference or inside a Function.
Tensor matmul_bias(const Tensor& a, const Tensor& b, const Tensor& bias);

// f32 products use TF32 tensor cores when allowed (off by default: full f32 accuracy).
void set_allow_tf32(bool allow);
bool allow_tf32();

}  // namespace kiln::cuda

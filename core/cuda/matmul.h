// Settings of the cuBLASLt matmul behind prim::Matmul on CUDA (core/cuda/matmul_ops.cpp): the TF32
// switch for f32 products.
#pragma once

namespace kiln::cuda {

// f32 products use TF32 tensor cores when allowed (off by default: full f32 accuracy).
void set_allow_tf32(bool allow);
bool allow_tf32();

}  // namespace kiln::cuda

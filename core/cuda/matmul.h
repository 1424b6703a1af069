// Settings of the cuBLASLt matmul behind prim::Matmul on CUDA (core/cuda/matmul_ops.cpp): the TF32
// switch for f32 products and GEMM tuning.
#pragma once

namespace kiln::cuda {

// f32 products use TF32 tensor cores when allowed (off by default: full f32 accuracy).
void set_allow_tf32(bool allow);
bool allow_tf32();

// Tuning: the first GEMM of each shape and layout times up to 8 of cuBLASLt's heuristic algorithms on
// its own operands (3 runs each, events on its stream; the host waits once) and keeps the fastest for
// that shape, instead of the heuristic's first choice. Off by default (the choice depends on timing, so
// two processes may round differently); KILN_GEMM_TUNE=1 in the environment turns it on at start. The
// switch applies to shapes first seen after it.
void set_gemm_tuning(bool on);
bool gemm_tuning();

}  // namespace kiln::cuda

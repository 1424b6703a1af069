// Registration of the CUDA kernels with the dispatcher, one function per family (each in its
// family's *_ops.cpp); called once by dispatch in builds with CUDA.
#pragma once

namespace kiln::cuda {

void register_kernels();  // all of the below
void register_copy_kernels();         // core/cuda/copy_ops.cpp: copy (H2D/D2H/D2D, cast, strided), fill, cat, slice_backward
void register_creation_kernels();     // core/cuda/creation_ops.cpp: arange, random, dropout
void register_elementwise_kernels();  // core/cuda/elementwise_ops.cpp: unary, binary, where
void register_reduce_kernels();       // core/cuda/reduce_ops.cpp: reductions, argmax, logsumexp, softmax
void register_matmul_kernels();       // core/cuda/matmul_ops.cpp: cuBLASLt
void register_nn_kernels();           // core/cuda/nn_ops.cpp: embedding, rms_norm, rope, cross-entropy, swiglu
void register_optim_kernels();        // core/cuda/optim_ops.cpp: fused multi-tensor AdamW (one launch)
void register_attention_kernels();    // core/cuda/attention_ops.cpp: cuDNN SDPA + flash fallback

}  // namespace kiln::cuda

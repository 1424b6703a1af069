// Registration of the CPU kernels with the dispatcher; one function per op family.
#pragma once

namespace kiln::cpu {

void register_kernels();  // all of the below
void register_copy_kernels();         // core/cpu/copy.cpp: contiguous/copy/cast/fill/to_device, cat, slice_backward
void register_creation_kernels();     // core/cpu/creation.cpp: arange, random
void register_elementwise_kernels();  // core/cpu/elementwise.cpp
void register_reduce_kernels();       // core/cpu/reduce.cpp
void register_matmul_kernels();       // core/cpu/matmul.cpp
void register_nn_kernels();           // core/cpu/nn.cpp
void register_optim_kernels();        // core/cpu/optim.cpp: fused multi-tensor AdamW

}  // namespace kiln::cpu

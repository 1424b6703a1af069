// Registers every CUDA kernel family with the dispatcher.
#include "core/cuda/register.h"

namespace kiln::cuda {

void register_kernels() {
  register_copy_kernels();
  register_creation_kernels();
  register_elementwise_kernels();
  register_reduce_kernels();
  register_matmul_kernels();
  register_nn_kernels();
  register_attention_kernels();
  register_optim_kernels();
}

}  // namespace kiln::cuda

// Registers every CPU kernel family with the dispatcher (called once, lazily, by dispatch).
#include "core/cpu/register.h"

namespace kiln::cpu {

void register_kernels() {
  register_copy_kernels();
  register_creation_kernels();
  register_elementwise_kernels();
  register_reduce_kernels();
  register_matmul_kernels();
  register_nn_kernels();
  register_optim_kernels();
}

}  // namespace kiln::cpu

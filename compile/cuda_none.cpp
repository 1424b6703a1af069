// Builds without CUDA: fused groups on a CUDA device cannot exist, and there is no kernel cache.
#include "compile/executor.h"

namespace kiln::compile {

void run_group_cuda(const Program&, const GroupArgs&) { KILN_FAIL("compile", "kiln was built without CUDA"); }
void clear_kernel_cache() {}

}  // namespace kiln::compile

// Builds without CUDA: fused groups on a CUDA device cannot exist, there is no kernel cache, and
// no NVRTC.
#include "compile/executor.h"
#include "compile/cubin.h"

namespace kiln::compile {

void run_group_cuda(const Program&, const GroupArgs&) { KILN_FAIL("compile", "kiln was built without CUDA"); }
void clear_kernel_cache() {}
std::string nvrtc_version() { KILN_FAIL("compile", "kiln was built without CUDA (no NVRTC)"); }
std::string compile_cubin(const std::string&, const std::string&) {
  KILN_FAIL("compile", "kiln was built without CUDA (no NVRTC)");
}

}  // namespace kiln::compile

// The GPU half of the local backend in a build without CUDA: never reached (LocalProcessGroup takes
// CUDA tensors only where a device is visible), but an explicit error if it were.
#include "core/error.h"
#include "dist/local_cuda.h"

namespace kiln::dist {

void local_cuda_enqueue(const std::vector<Call>& calls, const std::vector<std::unique_ptr<cuda::Event>>&, cuda::Event&) {
  KILN_FAIL(calls.empty() ? "dist local" : calls[0].name(), "this build of kiln has no CUDA backend");
}

}  // namespace kiln::dist

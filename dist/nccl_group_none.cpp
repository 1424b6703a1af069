// The NCCL backend in a build without it: an explicit error naming what is missing.
#include "core/error.h"
#include "dist/nccl_group.h"

namespace kiln::dist {

std::shared_ptr<ProcessGroup> make_nccl_group(std::shared_ptr<TcpStore>, int, std::chrono::milliseconds,
                                              const std::string&, bool) {
  KILN_FAIL("dist nccl", "this build of kiln has no NCCL backend (it needs the CUDA backend and NCCL: configure with "
            "-Dcuda=enabled -Dnccl=enabled)");
}

}  // namespace kiln::dist

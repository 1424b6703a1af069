// The Gloo backend in a build without Gloo: an explicit error naming the build option.
#include "core/error.h"
#include "dist/gloo_group.h"

namespace kiln::dist {

std::shared_ptr<ProcessGroup> make_gloo_group(std::shared_ptr<TcpStore>, std::chrono::milliseconds, const std::string&) {
  KILN_FAIL("dist gloo", "this build of kiln has no Gloo backend (configure with -Dgloo=enabled where libgloo-dev is "
            "installed)");
}

}  // namespace kiln::dist

// The process-wide default generator.
#include "core/random.h"

namespace kiln {

Generator& default_generator() {
  static Generator g(0);
  return g;
}

}  // namespace kiln

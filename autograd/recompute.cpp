// The record's analysis and switch (autograd/recompute.h).
#include "autograd/recompute.h"

#include <cstdlib>

namespace kiln::autograd::detail {

bool skipping_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("KILN_CHECKPOINT_RECOMPUTE_ALL");
    return v == nullptr || std::string(v) != "1";
  }();
  return allowed;
}

// A value's readers come after its maker: one pass from the end.
void mark_skippable(std::vector<Call>& calls) {
  std::vector<bool> read(calls.size(), false);
  for (size_t c = calls.size(); c-- > 0;) {
    Call& call = calls[c];
    const bool computes = !call.reused && (!call.may_skip || call.reads_outputs || read[c]);
    call.skip = !call.reused && !computes;
    call.outputs_read = read[c];
    for (size_t i = 0; i < call.producers.size(); ++i)
      if (call.producers[i] >= 0 && (computes || call.backward_reads[i])) read[static_cast<size_t>(call.producers[i])] = true;
  }
}

}  // namespace kiln::autograd::detail

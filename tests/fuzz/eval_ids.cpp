// Fuzz target: `kiln eval --ids` files (one JSON array of ids, or {"input_ids", "labels"}, per line)
// through app::read_eval_file with a vocabulary of 1000, then the count of scored targets.
#include <cstddef>
#include <cstdint>

#include "examples/kiln/eval.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kiln::fuzz::write_file(kiln::fuzz::scratch("ids.jsonl"), data, size);
  kiln::fuzz::expect_kiln_errors_only([&] {
    const std::vector<kiln::app::EvalSequence> seqs = kiln::app::read_eval_file(path, 1000);
    (void)kiln::app::count_scored_targets(seqs);
  });
  return 0;
}

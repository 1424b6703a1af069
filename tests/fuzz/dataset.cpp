// Fuzz target: training data files through data/dataset's readers: the UTF-8 check, JSON Lines rows,
// a *.json file (one JSON value or JSON Lines) and plain text split each of the three ways.
#include <cstddef>
#include <cstdint>

#include "data/dataset.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kiln::data;
  const std::string_view content = kiln::fuzz::as_text(data, size);
  kiln::fuzz::expect_kiln_errors_only([&] { check_text(content, "fuzz.txt"); });
  kiln::fuzz::expect_kiln_errors_only([&] { (void)parse_jsonl(content, "fuzz.jsonl"); });
  kiln::fuzz::expect_kiln_errors_only([&] { (void)parse_json(content, "fuzz.json"); });
  for (TextSplit split : {TextSplit::whole_file, TextSplit::blank_lines, TextSplit::separator}) {
    kiln::fuzz::expect_kiln_errors_only([&] { (void)parse_text(content, "fuzz.txt", TextOptions{split, "%"}); });
  }
  return 0;
}

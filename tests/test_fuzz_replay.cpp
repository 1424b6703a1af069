// The [fuzz] replay: every file of tests/fuzz/corpus/<target>/ and tests/fuzz/regressions/<target>/ fed
// to that target's LLVMFuzzerTestOneInput (tests/fuzz/<target>.cpp, compiled into kiln_tests with the
// function renamed kiln_fuzz_<target>), so every run re-checks the fuzzers' seeds and past crashes
// without clang. A target may throw only kiln::Error inside (it catches those); anything else fails here.
#include <algorithm>
#include <catch2/catch_test_macros.hpp>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_util.h"
#include "tests/helpers.h"

#define KILN_FUZZ_TARGETS(X) \
  X(adapter_config)          \
  X(bnb_quant_state)         \
  X(dataset)                 \
  X(eval_ids)                \
  X(finetune_config)         \
  X(llama_config)            \
  X(safetensors)             \
  X(safetensors_index)       \
  X(tokenizer)               \
  X(trainer_state)

#define KILN_DECLARE_FUZZ_TARGET(name) extern "C" int kiln_fuzz_##name(const uint8_t* data, size_t size);
KILN_FUZZ_TARGETS(KILN_DECLARE_FUZZ_TARGET)

namespace {

namespace fs = std::filesystem;
using FuzzFn = int (*)(const uint8_t*, size_t);

const std::map<std::string, FuzzFn>& fuzz_targets() {
#define KILN_FUZZ_ENTRY(name) {#name, &kiln_fuzz_##name},
  static const std::map<std::string, FuzzFn> targets{KILN_FUZZ_TARGETS(KILN_FUZZ_ENTRY)};
#undef KILN_FUZZ_ENTRY
  return targets;
}

// tests/fuzz, found like the fixtures (tests/data's sibling).
fs::path fuzz_dir() { return kiln::test::test_data("../fuzz").lexically_normal(); }

std::vector<fs::path> files_under(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_CASE("fuzz: every corpus and regression input replays through its target without a crash", "[fuzz]") {
  const fs::path dir = fuzz_dir();
  INFO("tests/fuzz at " << dir.string());
  REQUIRE(fs::is_directory(dir / "corpus"));
  // Each corpus folder belongs to a target, and each target has a non-empty corpus.
  std::set<std::string> folders;
  for (const char* kind : {"corpus", "regressions"})
    if (fs::is_directory(dir / kind))
      for (const auto& e : fs::directory_iterator(dir / kind))
        if (e.is_directory()) folders.insert(e.path().filename().string());
  for (const std::string& f : folders) {
    INFO("folder " << f);
    CHECK(fuzz_targets().count(f) == 1);
  }
  size_t replayed = 0;
  for (const auto& [name, fn] : fuzz_targets()) {
    const std::vector<fs::path> corpus = files_under(dir / "corpus" / name);
    INFO("target " << name);
    CHECK(corpus.size() >= 2);
    std::vector<fs::path> inputs = corpus;
    for (const fs::path& p : files_under(dir / "regressions" / name)) inputs.push_back(p);
    for (const fs::path& p : inputs) {
      INFO("input " << p.string());
      const std::string bytes = kiln::test::read_file(p);
      CHECK_NOTHROW(fn(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
      ++replayed;
    }
  }
  CHECK(replayed >= 2 * fuzz_targets().size());
}

TEST_CASE("fuzz: only kiln::Error is swallowed, so the replay fails on anything else", "[fuzz]") {
  // The targets wrap each parse in expect_kiln_errors_only: a replay that swallowed every exception could
  // never fail, so check that a std:: exception (the round-trip checks' std::logic_error) gets through.
  CHECK_NOTHROW(kiln::fuzz::expect_kiln_errors_only([] { KILN_FAIL("fuzz", "bad input"); }));
  CHECK_THROWS_AS(kiln::fuzz::expect_kiln_errors_only([] { throw std::logic_error("a bug"); }), std::logic_error);
  CHECK_THROWS_AS(kiln::fuzz::expect_kiln_errors_only([] { (void)std::vector<int>().at(1); }), std::out_of_range);
  // A broken safetensors header is a kiln::Error inside the target: it returns normally.
  const std::string bad = std::string("\x10\0\0\0\0\0\0\0{\"a\": 1}        ", 24);
  CHECK(fuzz_targets().at("safetensors")(reinterpret_cast<const uint8_t*>(bad.data()), bad.size()) == 0);
}

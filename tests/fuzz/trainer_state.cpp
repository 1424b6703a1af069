// Fuzz target: checkpoint metadata (train/checkpoint): trainer_state.json through TrainerState::from_json
// (a state that loads must survive to_json and back), and the same bytes as <output>/latest through
// latest_checkpoint (the run folder holds checkpoint-1/).
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "tests/fuzz/fuzz_util.h"
#include "train/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(kiln::fuzz::as_text(data, size));
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::train::TrainerState s = kiln::train::TrainerState::from_json(text, "trainer_state.json");
    const std::string written = s.to_json();
    const kiln::train::TrainerState again = kiln::train::TrainerState::from_json(written, "written");
    if (again.to_json() != written) throw std::logic_error("trainer_state.json does not round-trip:\n" + written);
  });
  static const std::filesystem::path run = [] {
    const std::filesystem::path r = kiln::fuzz::scratch("run");
    std::filesystem::create_directories(r / "checkpoint-1");
    return r;
  }();
  kiln::fuzz::write_file(run / "latest", data, size);
  kiln::fuzz::expect_kiln_errors_only([&] { (void)kiln::train::latest_checkpoint(run.string()); });
  return 0;
}

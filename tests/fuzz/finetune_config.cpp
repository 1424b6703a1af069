// Fuzz target: `kiln finetune --config-file` TOML through FinetuneConfig::load_toml (examples/kiln), then
// validate(); settings that load are written back as config.toml and must load again to the same settings.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "examples/kiln/finetune_config.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kiln::fuzz::write_file(kiln::fuzz::scratch("config.toml"), data, size);
  kiln::fuzz::expect_kiln_errors_only([&] {
    kiln::app::FinetuneConfig c;
    c.load_toml(path);
    const std::string written = c.to_toml();
    const std::string again_path = kiln::fuzz::scratch("config_again.toml").string();
    kiln::fuzz::write_file(again_path, reinterpret_cast<const uint8_t*>(written.data()), written.size());
    kiln::app::FinetuneConfig again;
    try {
      again.load_toml(again_path);
    } catch (const kiln::Error& e) {
      throw std::logic_error(std::string("config.toml written from loaded settings does not load: ") + e.what());
    }
    if (again.to_toml() != written) throw std::logic_error("config.toml does not round-trip:\n" + written);
    c.validate();
  });
  return 0;
}

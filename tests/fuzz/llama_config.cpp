// Fuzz target: a Hugging Face config.json through nn::LlamaConfig::from_json; a config that loads is
// validated, counted (num_parameters) and must survive to_json and back.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "nn/llama.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::nn::LlamaConfig c = kiln::nn::LlamaConfig::from_json(std::string(kiln::fuzz::as_text(data, size)));
    c.validate();
    (void)c.num_parameters();
    const std::string written = c.to_json();
    const kiln::nn::LlamaConfig again = kiln::nn::LlamaConfig::from_json(written, "written");
    if (again.to_json() != written) throw std::logic_error("config.json does not round-trip:\n" + written);
  });
  return 0;
}

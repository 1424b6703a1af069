// Fuzz target: PEFT's adapter_config.json through nn::LoraConfig::from_peft_json; a config that loads is
// matched against Llama module paths (as load_adapter does) and must survive to_peft_json and back.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "nn/lora.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::nn::LoraConfig c = kiln::nn::LoraConfig::from_peft_json(std::string(kiln::fuzz::as_text(data, size)));
    for (const char* path : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"})
      (void)c.matches(path);
    (void)c.scaling();
    const std::string written = c.to_peft_json();
    const kiln::nn::LoraConfig again = kiln::nn::LoraConfig::from_peft_json(written);
    if (again.to_peft_json() != written) throw std::logic_error("adapter_config.json does not round-trip:\n" + written);
  });
  return 0;
}

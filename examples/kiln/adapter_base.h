// What `kiln finetune` records next to the PEFT files of an adapter (<adapter>/kiln_base.json): the base
// the adapter was trained on (model folder, or named config with the seed of its random weights), NF4 or
// not, and the tokenizer, so that `kiln generate/eval --adapter DIR` load that base unless told otherwise.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "examples/kiln/app.h"

namespace kiln::app {

inline constexpr const char* kAdapterBaseFile = "kiln_base.json";

struct AdapterBase {
  std::string model_dir;  // absolute; or, for a random-weight base:
  std::string config;     // a named config, or the absolute path of a config.json
  uint64_t seed = 0;      // of the random weights (and everything random in the run)
  bool nf4 = false;       // the base's linear layers were NF4 (QLoRA)
  std::string tokenizer;  // absolute; "" when it was the model's or kiln's default
  std::string dtype;      // what the base was built in ("f32", "bf16", "f16"): NF4 codes and random weights
                          // depend on it; "" in files written before it was recorded
};

// Writes <adapter_dir>/kiln_base.json atomically (nlohmann-json; PEFT ignores the file).
void write_adapter_base(const std::string& adapter_dir, const AdapterBase& base);
// nullopt when the folder has no kiln_base.json (an adapter from elsewhere); a malformed file is
// kiln::Error "[adapter] <path>: ...".
std::optional<AdapterBase> read_adapter_base(const std::string& adapter_dir);

// Which model options the user gave on the command line.
struct GivenModelOptions {
  bool model = false, config = false, seed = false, nf4 = false, tokenizer = false;
  bool dtype = false;  // --dtype (generate, eval) or --base-dtype (export, whose --dtype is the output's)
};
GivenModelOptions given_model_options(const CLI::App& cmd);

// With spec.adapter holding a kiln_base.json: fills what the user did not give (--model/--config, --nf4,
// the base's dtype, --tokenizer when `tokenizer` is not null) from it, and for a random-weight base always takes the recorded
// seed for the weights (a different --seed then only seeds sampling). What the user gave and the record
// disagree on is kept as given and returned as a warning.
std::vector<std::string> apply_adapter_base(ModelSpec& spec, std::string* tokenizer, const GivenModelOptions& given);

}  // namespace kiln::app

// Training checkpoints: <output>/checkpoint-<step>/ holding the adapter (PEFT format), the optimizer
// state and trainer_state.json (step, data position, RNG state, settings fingerprint, loss history),
// written into a temporary folder and renamed, with <output>/latest naming the newest one.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "core/random.h"
#include "data/packing.h"
#include "examples/kiln/progress.h"
#include "nn/lora.h"
#include "nn/optim.h"

namespace kiln::app {

struct TrainerState {
  int64_t step = 0;                 // optimizer steps done
  int64_t tokens = 0;               // loss tokens trained on
  data::DataPosition data;          // where the training stream continues
  GeneratorState rng;               // the default generator (dropout)
  std::string fingerprint;          // FinetuneConfig::fingerprint() of the run
  std::vector<LossPoint> train_losses, eval_losses;

  std::string to_json() const;
  static TrainerState from_json(const std::string& text, const std::string& source);
};

// Writes checkpoint-<step> atomically and points <output>/latest at it; returns its path.
std::string save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig& lora,
                            const nn::Optimizer& optimizer, const TrainerState& state);
// The folder <output>/latest names, if any.
std::optional<std::string> latest_checkpoint(const std::string& output);
// Checks the checkpoint against `fingerprint` (a clear error listing what differs), then loads the
// adapter into `model` and the optimizer state. Corrupt or incompatible files are errors.
TrainerState load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                             const std::string& fingerprint);

}  // namespace kiln::app

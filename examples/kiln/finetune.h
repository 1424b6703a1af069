// `kiln finetune` as a function the tests can call: QLoRA/LoRA training with gradient accumulation,
// clipping, an LR schedule, eval loss, metrics, checkpoints (every N steps and on Ctrl-C) and
// exact resume, ending with a generated sample.
#pragma once
#include <string>
#include <vector>

#include "examples/kiln/finetune_config.h"

namespace kiln::app {

struct FinetuneResult {
  std::vector<double> losses;       // train loss of each optimizer step run by this call
  int64_t first_step = 0;           // the step the call started at (> 0 after --resume)
  int64_t last_step = 0;            // steps done at the end
  std::vector<double> eval_losses;  // eval losses computed by this call
  std::string checkpoint;           // the last checkpoint written
  std::string sample;               // the generated sample ("" when sample_tokens is 0)
  bool interrupted = false;         // stopped by Ctrl-C (or stop_after_steps) with a checkpoint
};

struct FinetuneHooks {
  int64_t stop_after_steps = 0;  // > 0: behave as if Ctrl-C came after this many steps of this call
  bool quiet = false;            // no progress line and no sample on stdout
};

FinetuneResult run_finetune(const FinetuneConfig& config, const FinetuneHooks& hooks = {});

}  // namespace kiln::app

// Training checkpoints: <output>/checkpoint-<step>/ holding the trained weights (a PEFT adapter
// folder for LoRA, else trainable.safetensors), the optimizer state and trainer_state.json (step,
// data position, RNG state, settings fingerprint, loss history); written atomically, <output>/latest names the newest.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/random.h"
#include "data/packing.h"
#include "nn/lora.h"
#include "nn/module.h"
#include "nn/optim.h"

namespace kiln::train {

struct LossPoint {
  int64_t step;
  double loss;
};

// Everything besides weights and optimizer that an exact resume needs, plus the loss history
// (so plots continue across a resume).
struct TrainerState {
  int64_t step = 0;                 // optimizer steps done
  int64_t tokens = 0;               // loss tokens trained on (all ranks)
  int64_t skipped_steps = 0;        // steps skipped for a non-finite loss or gradient (TrainerOptions::skip_nonfinite_steps)
  data::DataPosition data;          // where the training stream continues
  GeneratorState rng;               // the default generator (dropout draws)
  std::string fingerprint;          // TrainerOptions::fingerprint of the run ("key=value;" pairs)
  std::vector<LossPoint> train_losses, eval_losses;

  std::string to_json() const;
  // kiln::Error "[checkpoint] <source>: corrupt trainer state: ..." on anything malformed.
  static TrainerState from_json(const std::string& text, const std::string& source);
};

// Writes <output>/checkpoint-<step> into checkpoint-<step>.tmp, renames it into place and then
// points <output>/latest at it; returns its path. `lora` set: the weights are the adapter in PEFT's
// format (<dir>/adapter); otherwise the model's trainable parameters (<dir>/trainable.safetensors).
// Failure drills: a process killed at any point leaves <output>/latest naming a complete checkpoint
// (a partial checkpoint-<step>.tmp is never named; the next successful save removes such leftovers). A failed
// write (disk full, read-only folder) removes the .tmp folder, leaves the previous checkpoint and
// latest as they were, and throws "[checkpoint] writing <path> failed: <the writer's error, with the
// OS reason>; the previous checkpoint <dir> is intact". Saving a step whose folder exists (a resumed
// run saving the step it began at) moves the old folder to checkpoint-<step>.old until the new one
// is in place; latest_checkpoint() falls back to it if a kill came in between.
std::string save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                            const nn::Optimizer& optimizer, const TrainerState& state);
// The folder <output>/latest names (or its .old copy, see save_checkpoint); nullopt when there is no
// latest file. A latest file naming a missing folder is an error.
std::optional<std::string> latest_checkpoint(const std::string& output);
// Test seam for the failure drills (tests/test_trainer_drills.cpp): when set, save_checkpoint calls it
// with each path just before creating it: <tmp>/adapter or <tmp>/trainable.safetensors,
// <tmp>/optimizer.safetensors, <tmp>/trainer_state.json, <output>/checkpoint-<step>.old (only when that
// step's folder exists), <output>/checkpoint-<step> (the rename into place), <output>/latest. The hook
// may throw (an injected write failure) or block (to be killed mid-write). Process-wide, not
// thread-safe; pass an empty function to remove it. Unset (the default) it costs nothing.
using CheckpointWriteHook = std::function<void(const std::string& path)>;
void set_checkpoint_write_hook(CheckpointWriteHook hook);
// The pieces save/load_checkpoint are made of, for writers of other layouts (dist/'s sharded checkpoints):
// "checkpoint-<step>"; <output>/latest pointing at <output>/<name> (written atomically); <dir>/trainer_state.json
// read and checked against `fingerprint` (the error lists each differing key).
std::string checkpoint_name(int64_t step);
void set_latest_checkpoint(const std::string& output, const std::string& name);
TrainerState read_trainer_state(const std::string& dir, const std::string& fingerprint);

// Checks the checkpoint against `fingerprint` (the error lists each differing key: "lora_r:
// checkpoint '4', now '8'"), then loads the weights into `model` and the optimizer state. Corrupt,
// missing or mismatched files are kiln::Error.
TrainerState load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                             const std::string& fingerprint);

}  // namespace kiln::train

// `kiln finetune`: settings -> parts (model with LoRA, tokenizer, data, optimizer, schedule) -> a
// train::Trainer -> callbacks (metrics.jsonl and the loss curve; on the command line also the progress
// bar, messages and Ctrl-C), ending with the final adapter and a generated sample.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "dist/fully_shard.h"
#include "examples/kiln/distributed.h"
#include "examples/kiln/finetune_config.h"
#include "nn/llama.h"
#include "nn/optim.h"
#include "train/trainer.h"

namespace kiln::app {

struct FinetuneResult {
  std::vector<double> losses;       // train loss of each optimizer step run by this call
  int64_t first_step = 0;           // the step the call started at (> 0 after --resume)
  int64_t last_step = 0;            // steps done at the end
  std::vector<double> eval_losses;  // eval losses computed by this call
  std::string checkpoint;           // the last checkpoint written
  std::string sample;               // the generated sample ("" when sample_tokens is 0 or stopped)
  bool interrupted = false;         // stopped (Ctrl-C) with a checkpoint
};

// The parts of one run, built from its settings; the command adds its terminal output around it.
class FinetuneJob {
 public:
  // Validates the settings and the output folder (writable), checks that one step fits in the machine's
  // memory (CPU: an estimate against MemAvailable), builds the parts and the Trainer (resumed from
  // <output>/latest with config.resume: an error when there is none, or when it already reached the
  // run's steps; a resume with more --steps extends a finished run), attaches the metrics.jsonl/
  // loss_curve.svg callback and, once all that succeeded, writes <output>/config.toml. In a world of
  // several ranks (join_world) every rank builds the same parts, the model sharded with config.shard,
  // and rank 0 alone writes files.
  explicit FinetuneJob(const FinetuneConfig& config, RunWorld world = {});
  FinetuneJob(const FinetuneJob&) = delete;
  FinetuneJob& operator=(const FinetuneJob&) = delete;
  ~FinetuneJob();

  train::Trainer& trainer() { return *trainer_; }
  nn::Llama& model() { return *model_; }
  // Trains to the end or a stop request, writes <output>/adapter (with kiln_base.json: the base for
  // kiln generate --adapter, also in each checkpoint's adapter; with config.full, <output>/model: the
  // whole trained model as a Hugging Face folder) and, unless stopped, the sample
  // (<output>/sample.txt: valid UTF-8, no special tokens). Sharded: every rank takes part (the adapter is gathered, the sample generated
  // in lockstep for sample_tokens tokens, then cut at a stop token).
  FinetuneResult run();
  const RunWorld& world() const { return world_; }
  // The one-line summary of the run the command prints before training.
  std::string banner() const;
  const std::optional<std::string>& resumed_from() const { return resumed_from_; }
  // "warning: ..." / "note: ..." lines about the settings (the command prints them before the banner).
  const std::vector<std::string>& notes() const { return notes_; }

 private:
  FinetuneConfig config_;
  std::string model_dir_;  // the base's folder: --model or the default base ("" for --config)
  std::string data_path_;  // --data or the default corpus
  RunWorld world_;
  Device device_;
  std::shared_ptr<nn::Llama> model_;
  std::shared_ptr<dist::FsdpUnit> shards_;  // the root unit when sharded
  std::unique_ptr<data::Tokenizer> tokenizer_;
  nn::LoraConfig lora_;
  std::unique_ptr<data::PackedDataset> train_data_;
  size_t n_train_docs_ = 0, n_eval_docs_ = 0;
  int64_t total_steps_ = 0;
  std::unique_ptr<nn::AdamW> optimizer_;
  std::unique_ptr<train::Trainer> trainer_;
  std::optional<std::string> resumed_from_;
  std::vector<std::string> notes_;
};

// The command: the world (join_world: the launcher's variables), the job, the progress bar and messages on
// stderr and the sample on stdout (rank 0), and Ctrl-C as a stop request (the result says interrupted; the
// command then exits with 130). With several ranks an error names the rank it happened on.
FinetuneResult run_finetune(const FinetuneConfig& config);

}  // namespace kiln::app

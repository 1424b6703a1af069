// The training loop as a library: Trainer runs optimizer steps over micro-batches with token-weighted
// gradient accumulation, clipping, an LR schedule, eval loss, atomic checkpoints with exact resume,
// stop on request, callbacks, and the seams where data parallelism and compilation plug in.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/packing.h"
#include "nn/lora.h"
#include "nn/lr_schedule.h"
#include "nn/memory_plan.h"
#include "nn/module.h"
#include "nn/optim.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"

namespace kiln::train {

// The loss of one micro-batch (already on the trainer's device): the SUM of the per-token losses over
// its loss tokens (labels != -100), a 0-d float tensor. The trainer divides by the loss tokens of the
// whole step (all micro-batches, all ranks), so a step's gradient is the token-weighted mean.
using BatchLossFn = std::function<Tensor(nn::Module& model, const data::Batch& batch)>;

// The default: `model` must be an nn::Llama; summed cross-entropy of its hidden states against the
// labels through the chunked linear+loss head (the full logits never exist) or, with chunked = false,
// through the full f32 logits.
BatchLossFn llama_loss(bool chunked = true);

// The compilation seam: called once by the Trainer's constructor with the model and the loss function,
// it returns the function the trainer then calls for every micro-batch (training and eval). compile/'s
// jit will plug in here (trace the forward and loss once, replay the fused plan); unset, the loss runs eagerly.
using CompileFn = std::function<BatchLossFn(nn::Module& model, BatchLossFn loss)>;

struct TrainerOptions {
  // ---- the step
  int64_t max_steps = 0;     // fit() stops when state().step reaches it; 0: when the training data ends
  int64_t grad_accum = 1;    // micro-batches per optimizer step (per rank)
  double clip = 1.0;         // clip gradients to this global L2 norm; 0: off
  std::optional<nn::LRSchedule> schedule;  // the lr of each step (lr_at(step)); unset: the optimizer's lr stays
  BatchLossFn loss;          // unset: llama_loss()
  Device device = kCPU;      // where batches are moved before the loss
  uint64_t seed = 0;         // a new run seeds the default generator (dropout) from it; resume restores it
  // A step whose loss or gradient holds NaN/inf (one check per step: the step loss and the global
  // gradient norm; the culprit tensor is looked for only when it trips) never reaches the optimizer.
  // false: train_step()/fit() throw "[trainer] step N: the loss is nan ..." or "... the gradient of
  // '<parameter>' holds inf ...". true: the step is skipped (no update, its batches consumed), counted
  // in FitResult/TrainerState::skipped_steps and reported to Callback::on_step_skipped; more than 16
  // skipped steps in a row stop with the error.
  bool skip_nonfinite_steps = false;
  // ---- evaluation: token-weighted loss over up to eval_batches batches of eval_data (restarted each time)
  std::shared_ptr<data::PackedDataset> eval_data;
  int64_t eval_every = 0;    // after every N steps and after the last one; 0: only when evaluate() is called
  int64_t eval_batches = 4;
  // ---- checkpoints in <output>/checkpoint-<step> (train/checkpoint.h)
  std::string output;        // "": no checkpoints (save_checkpoint() and resume are errors)
  int64_t save_every = 0;    // also every N steps; fit() always saves when it ends or stops
  std::optional<nn::LoraConfig> lora;  // set: the weights are saved as a PEFT adapter; else trainable.safetensors
  std::string fingerprint;   // "key=value;" settings that must match on resume (differences are listed)
  // ---- reporting
  int64_t log_every = 1;     // StepInfo::log is set every N steps and on the last one
  // ---- memory (nn/memory_plan.h)
  // Set: the constructor plans which decoder layers to checkpoint and the loss head's chunk size for
  // train_data's batch size and sequence length, the fastest plan whose predicted peak fits, applies
  // it to the model and keeps it (memory_plan()). The model must be an nn::Llama trained with the
  // default loss (`loss` unset) by one process. 0: the default budget (nn::default_memory_budget:
  // the device's free memory less a margin); else bytes. Unset: no planning (the model's own
  // settings stay).
  std::optional<size_t> memory_budget;
  // The planner's other settings (probe lengths, MLP pieces when nothing fits); the trainer sets
  // the batch, the sequence length, the budget and the optimizer state itself.
  nn::MemoryPlanOptions memory_plan_options;
  // ---- seams
  std::shared_ptr<DataParallel> parallel;  // unset: SingleProcess (see data_parallel.h)
  CompileFn compile;                       // unset: eager
};

struct StepInfo {
  int64_t step = 0;           // steps done, this one included
  int64_t total_steps = 0;    // max_steps (0: unbounded)
  double loss = 0;            // token-weighted mean loss of the step (all ranks)
  double lr = 0;              // the lr the step used
  double grad_norm = 0;       // the global gradient L2 norm, before clipping
  int64_t loss_tokens = 0;    // of this step, all ranks
  int64_t tokens = 0;         // loss tokens of the run so far
  double tokens_per_s = 0;    // input tokens per second since the previous logged step (all ranks)
  double memory_gib = 0;      // peak allocated on CUDA, resident set on the CPU
  bool log = false;           // a logging step (log_every)
  bool skipped = false;       // a non-finite loss or gradient: no update (skip_nonfinite_steps); `step` is
                              // the step it would have been, state().step is unchanged
  std::string skip_reason;    // "step N: the loss is nan ...", as the error would have said
};

struct EvalInfo {
  int64_t step = 0;
  double loss = 0;            // NaN when the eval data held no loss token
  int64_t tokens = 0;
};

struct SaveInfo {
  int64_t step = 0;
  std::string path;           // the checkpoint folder
};

struct EndInfo {
  int64_t step = 0;
  bool stopped = false;       // ended by request_stop()
  std::string checkpoint;     // the last checkpoint written by this fit() ("" without output)
};

class Trainer;

// Override what you need; every method runs on the training thread, on every rank. A callback may
// call trainer.request_stop() (the step in progress is the last) or read trainer.state().
class Callback {
 public:
  virtual ~Callback() = default;
  virtual void on_train_begin(Trainer&) {}
  virtual void on_step_end(Trainer&, const StepInfo&) {}
  virtual void on_step_skipped(Trainer&, const StepInfo&) {}  // instead of on_step_end (skip_nonfinite_steps)
  virtual void on_eval(Trainer&, const EvalInfo&) {}      // after on_step_end of that step
  virtual void on_save(Trainer&, const SaveInfo&) {}      // after the checkpoint is complete
  virtual void on_train_end(Trainer&, const EndInfo&) {}
};

struct FitResult {
  int64_t first_step = 0;            // state().step when fit() began
  int64_t last_step = 0;
  std::vector<double> losses;        // each step's loss
  int64_t skipped_steps = 0;         // steps skipped for a non-finite loss or gradient (skip_nonfinite_steps)
  std::vector<double> eval_losses;
  std::string checkpoint;            // the last checkpoint written ("" without output)
  bool stopped = false;              // ended by request_stop()
};

class Trainer {
 public:
  // The trainer keeps references: model, optimizer and train_data must outlive it. The optimizer
  // holds the parameters to train (normally model.named_trainable_parameters()). Seeds the default
  // generator with options.seed and applies options.compile.
  Trainer(nn::Module& model, nn::Optimizer& optimizer, data::PackedDataset& train_data, TrainerOptions options = {});
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  void add_callback(std::shared_ptr<Callback> callback);

  // Loads a checkpoint folder (weights, optimizer, data position, RNG, history) after checking its
  // fingerprint; resume_latest() loads <output>/latest and returns its folder, nullopt when none.
  void resume(const std::string& dir);
  std::optional<std::string> resume_latest();

  // Steps until max_steps, the end of the data, or a stop request; evaluates and saves as the options
  // say and always saves at the end (when output is set). A stop request is consumed by the fit() it
  // ends. The model trains in the mode it is in (call model.train() first for dropout).
  FitResult fit();
  // One optimizer step over the next micro-batches without callbacks, eval or saving; nullopt when
  // the training data is done. A non-finite step throws, or returns with `skipped` set (skip_nonfinite_steps).
  std::optional<StepInfo> train_step();
  // The token-weighted mean loss over up to eval_batches batches of eval_data (eval mode, no grad).
  EvalInfo evaluate();
  // Writes <output>/checkpoint-<step> now (rank 0 writes; every rank gets the path).
  std::string save_checkpoint();

  // Thread- and async-signal-safe (one lock-free atomic store): the step in progress finishes, a
  // checkpoint is written, fit() returns with stopped set.
  void request_stop() noexcept { stop_.store(true, std::memory_order_relaxed); }
  bool stop_requested() const noexcept { return stop_.load(std::memory_order_relaxed); }

  const TrainerState& state() const { return state_; }
  const TrainerOptions& options() const { return options_; }
  // The memory plan applied at construction (TrainerOptions::memory_budget); nullopt without one.
  const std::optional<nn::MemoryPlan>& memory_plan() const { return memory_plan_; }
  nn::Module& model() { return model_; }
  nn::Optimizer& optimizer() { return optimizer_; }
  DataParallel& parallel() { return *parallel_; }

 private:
  // This rank's micro-batches of the step; `slots`: the most any rank got (grad_accum until the data ends).
  std::vector<data::Batch> next_micro_batches(int64_t& slots);
  void plan_memory();  // TrainerOptions::memory_budget: plans and applies memory_plan_
  bool stop_agreed();  // any rank asked to stop
  // "step N: the loss is nan" / "the gradient of 'p' holds inf" (a host read per parameter: only once the check tripped).
  std::string nonfinite_report(double loss, double grad_norm) const;
  template <class F> void each_callback(F&& f);

  nn::Module& model_;
  nn::Optimizer& optimizer_;
  data::PackedDataset& train_data_;
  TrainerOptions options_;
  std::shared_ptr<DataParallel> parallel_;
  BatchLossFn loss_;                     // after compile
  nn::NamedTensors params_;           // the optimizer's parameters
  std::optional<data::DataPosition> eval_start_;
  std::optional<nn::MemoryPlan> memory_plan_;
  TrainerState state_;
  std::vector<std::shared_ptr<Callback>> callbacks_;
  std::atomic<bool> stop_{false};
  int64_t consecutive_skips_ = 0;        // non-finite steps in a row (skip_nonfinite_steps)
  static_assert(std::atomic<bool>::is_always_lock_free, "request_stop must be async-signal-safe");
  // tokens/s window: since the previous logged step
  std::chrono::steady_clock::time_point window_start_;
  int64_t window_tokens_ = 0;
};

}  // namespace kiln::train

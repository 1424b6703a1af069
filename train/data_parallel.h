// The data-parallel seam of the Trainer: the world of ranks a run is part of, and what the trainer needs
// from it (sums of scalars and of gradients, the global gradient norm, checkpoints). SingleProcess is the
// default; dist/'s FsdpParallel plugs a process group in (plain data parallel or fully_shard).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "nn/lora.h"
#include "nn/optim.h"
#include "train/checkpoint.h"

namespace kiln::train {

// How the Trainer uses it, per optimizer step (every rank runs the same Trainer code):
//   - the training stream is sharded by rank: each micro-batch slot reads world_size() batches
//     and rank r keeps the r-th, so every rank sees the same data position (one checkpoint serves all)
//     and W ranks with grad_accum G train on the batches one process with grad_accum W*G would;
//   - all_reduce_sum({loss tokens, micro-batches, input tokens}) before backward, so each rank
//     divides its summed loss by the step's global loss-token count;
//   - all_reduce_gradients(trainable parameters) after backward, then clip_grad_norm, so every rank
//     clips with the global norm and steps on the global gradient (or its shard of it);
//   - all_reduce_sum({loss}) for the reported step loss, {loss sum, tokens} for eval (whose batches
//     are sharded the same way), and {stop requested} so all ranks stop at the same step;
//   - lockstep(): forward and backward run collectives (a sharded model), so every rank runs the same
//     number of them: a rank short of a micro-batch (the data's end) or of an eval batch runs one with no
//     loss token, and micro-batches without loss tokens are not skipped;
//   - save_checkpoint / load_checkpoint on every rank.
// Callbacks run on every rank.
class DataParallel {
 public:
  virtual ~DataParallel() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  // Replaces each value by its sum over ranks (every rank passes the same number of values).
  virtual void all_reduce_sum(std::vector<double>& values) = 0;
  // Replaces each parameter's .grad by its sum over ranks. Ranks pass the same parameters in the same
  // order; an undefined grad counts as zeros (a rank that had no micro-batch with loss tokens) and
  // must be defined afterwards when any rank had one. A sharded model has reduced them already.
  virtual void all_reduce_gradients(const nn::NamedTensors& params) = 0;
  // clip_grad_norm_ over the global gradient; the default suits gradients every rank holds whole.
  virtual double clip_grad_norm(const nn::NamedTensors& params, double max_norm) {
    return nn::clip_grad_norm_(params, max_norm);
  }
  virtual bool lockstep() const { return false; }
  // Writes <output>/checkpoint-<state.step> and returns its path on every rank. Default: rank 0 writes
  // train::save_checkpoint (the others wait for it where the implementation can).
  virtual std::string save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                                      const nn::Optimizer& optimizer, const TrainerState& state);
  // Default: every rank reads the folder with train::load_checkpoint.
  virtual TrainerState load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                                       const std::string& fingerprint);
};

// One process: rank 0 of 1, every collective is the identity.
class SingleProcess final : public DataParallel {
 public:
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  void all_reduce_sum(std::vector<double>&) override {}
  void all_reduce_gradients(const nn::NamedTensors&) override {}
};

}  // namespace kiln::train

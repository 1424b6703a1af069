// The data-parallel seam of the Trainer: the world of ranks a run is part of, and the collectives the
// trainer needs (sums of scalars and of gradients). SingleProcess is the default; dist/ will plug
// a NCCL process group (and fully_shard's reduce-scatter) in through the same interface.
#pragma once
#include <cstdint>
#include <vector>

#include "nn/optim.h"

namespace kiln::train {

// How the Trainer uses it, per optimizer step (every rank runs the same Trainer code):
//   - the training stream is sharded by rank: each micro-batch slot reads world_size() batches
//     and rank r keeps the r-th, so every rank sees the same data position (one checkpoint serves all)
//     and W ranks with grad_accum G train on the batches one process with grad_accum W*G would;
//   - all_reduce_sum({loss tokens, micro-batches, input tokens}) before backward, so each rank
//     divides its summed loss by the step's global loss-token count;
//   - all_reduce_gradients(trainable parameters) after backward, before clipping, so every rank
//     clips and steps on the same global gradient;
//   - all_reduce_sum({loss}) for the reported step loss, {loss sum, tokens} for eval (whose batches
//     are sharded the same way), and {stop requested} so all ranks stop at the same step.
// Only rank 0 writes checkpoints; every rank loads them on resume. Callbacks run on every rank.
class DataParallel {
 public:
  virtual ~DataParallel() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  // Replaces each value by its sum over ranks (every rank passes the same number of values).
  virtual void all_reduce_sum(std::vector<double>& values) = 0;
  // Replaces each parameter's .grad by its sum over ranks. Ranks pass the same parameters in the same
  // order; an undefined grad counts as zeros (a rank that had no micro-batch with loss tokens) and
  // must be defined afterwards when any rank had one.
  virtual void all_reduce_gradients(const nn::NamedTensors& params) = 0;
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

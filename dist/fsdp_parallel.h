// FsdpParallel: the Trainer's data-parallel seam (train/data_parallel.h) on a ProcessGroup. Plain data
// parallel: every rank holds the whole model and the gradients are summed by one flat all_reduce. Sharded
// (given fully_shard's root unit): backward has reduce-scattered them already, clipping uses the global
// norm over the shards, every forward/backward runs in lockstep, and checkpoints are sharded.
#pragma once
#include <memory>

#include "dist/fully_shard.h"
#include "train/data_parallel.h"

namespace kiln::dist {

class FsdpParallel final : public train::DataParallel {
 public:
  // `device`: where the scalars and gradients the collectives move live (the model's device). `root`: the
  // unit fully_shard/shard_llama returned for the trained model; null for plain data parallel.
  FsdpParallel(std::shared_ptr<ProcessGroup> group, Device device, std::shared_ptr<FsdpUnit> root = nullptr);

  int64_t rank() const override { return group_->rank(); }
  int64_t world_size() const override { return group_->size(); }
  // One f64 all_reduce.
  void all_reduce_sum(std::vector<double>& values) override;
  // Plain: one all_reduce of every gradient and a has-gradient flag per parameter, in f32 (the grads are
  // cast back to their dtype). Sharded: nothing to do (checks that fully_shard manages every parameter).
  void all_reduce_gradients(const nn::NamedTensors& params) override;
  double clip_grad_norm(const nn::NamedTensors& params, double max_norm) override;
  bool lockstep() const override { return root_ != nullptr; }
  // Sharded: dist/sharded_checkpoint.h. Plain: rank 0 writes train::save_checkpoint, then a barrier.
  std::string save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                              const nn::Optimizer& optimizer, const train::TrainerState& state) override;
  train::TrainerState load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                                      const std::string& fingerprint) override;

  ProcessGroup& group() const { return *group_; }
  const std::shared_ptr<FsdpUnit>& root() const { return root_; }

 private:
  std::shared_ptr<ProcessGroup> group_;
  Device device_;
  std::shared_ptr<FsdpUnit> root_;
  bool checked_ = false;  // sharded: the parameters were checked against the units
};

}  // namespace kiln::dist

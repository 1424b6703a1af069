// Checkpoints of a model sharded by fully_shard: every rank writes its shards of the trainable tensors
// and of the optimizer state (no gather); a resume regathers them and reshards for the world it runs in,
// which may differ (2 -> 3, 4 -> 1). The PEFT adapter is gathered and written once, by rank 0.
//
// Layout of <output>/checkpoint-<step>/ (written in checkpoint-<step>.tmp/, renamed when complete):
//   shards/rank-<r>-of-<W>.safetensors  rank r's tensors: "<param>" (its zero-padded rows, or the whole
//                                        tensor when replicated) and "optimizer/<param>.<key>"; metadata:
//                                        format, rank, world_size, the full shapes, the optimizer's type,
//                                        step, hyperparameters and parameter names
//   sharded.json                         {"format": "kiln-fsdp-checkpoint-1", "world_size": W}
//   trainer_state.json                   as train::save_checkpoint writes it
// Every rank reads every shard file of the folder, so the folder must be visible to all of them.
#pragma once
#include <string>

#include "dist/fully_shard.h"
#include "nn/lora.h"
#include "nn/optim.h"
#include "train/checkpoint.h"

namespace kiln::dist {

// Every rank calls it (collective); returns the folder's path on every rank.
std::string save_sharded_checkpoint(const std::string& output, FsdpUnit& root, const nn::Optimizer& optimizer,
                                    const train::TrainerState& state);
// Every rank calls it: checks the fingerprint, loads this rank's rows of every trainable tensor and of the
// optimizer state (whatever world size wrote them) and returns the trainer state. Missing, unexpected or
// mis-shaped tensors are errors naming them; the units are resharded first.
train::TrainerState load_sharded_checkpoint(const std::string& dir, FsdpUnit& root, nn::Optimizer& optimizer,
                                            const std::string& fingerprint);

// The full trainable tensors of every unit of `root`'s schedule by their names in `model` (a collective).
nn::StateDict gather_trainable_state(FsdpUnit& root, nn::Module& model);
// Every rank calls it: the adapter is gathered and rank 0 writes the PEFT folder nn::save_adapter writes
// for the unsharded model; the others wait until it is complete.
void save_adapter_sharded(FsdpUnit& root, nn::Module& model, const nn::LoraConfig& config, const std::string& dir);

}  // namespace kiln::dist

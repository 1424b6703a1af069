// The data-parallel seam's default checkpoint handling: rank 0 writes, every rank reads.
#include "train/data_parallel.h"

#include <filesystem>

namespace kiln::train {

std::string DataParallel::save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                                          const nn::Optimizer& optimizer, const TrainerState& state) {
  if (rank() == 0) return train::save_checkpoint(output, model, lora, optimizer, state);
  return (std::filesystem::path(output) / fmt::format("checkpoint-{}", state.step)).string();
}

TrainerState DataParallel::load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                                           const std::string& fingerprint) {
  return train::load_checkpoint(dir, model, optimizer, fingerprint);
}

}  // namespace kiln::train

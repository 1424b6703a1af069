// The model the training benchmarks measure, built one way: a Llama of the given config in bf16 with
// its linear layers quantised to NF4 while built, LoRA r=16 (alpha 32) on every linear layer, in
// training mode; and one training step as kiln finetune runs it (the chunked loss head, backward,
// clipping at 1.0, AdamW).
#pragma once
#include <memory>

#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "nn/optim.h"

namespace kiln::bench {

inline std::shared_ptr<nn::Llama> qlora_llama(const nn::LlamaConfig& config, Device device) {
  nn::LlamaOptions o;
  o.dtype = DType::bf16;
  o.device = device;
  o.seed = 1;
  o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto model = std::make_shared<nn::Llama>(config, o);
  nn::LoraConfig lora;
  lora.r = 16;
  lora.alpha = 32;
  nn::apply_lora(*model, lora, 2);
  model->train();
  return model;
}

// ids and targets (B, T) int.
inline void training_step(nn::Llama& model, nn::Optimizer& opt, const Tensor& ids, const Tensor& targets) {
  Tensor loss = model.chunked_loss(model(ids), targets, Reduction::mean, /*overwrite_hidden=*/true);  // as the Trainer
  loss.backward();
  nn::clip_grad_norm_(opt.parameters(), 1.0);
  opt.step();
  opt.zero_grad();
}

}  // namespace kiln::bench

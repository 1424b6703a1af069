// Plain weights from fine-tuned layers: LoRA adapters merged into their Linear or NF4 base (peft's
// merge_and_unload), NF4 weights dequantised, so a fine-tuned model can be written as an ordinary
// checkpoint (examples/kiln/export.cpp writes Hugging Face folders and GGUF files from these).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "nn/layers.h"

namespace kiln::nn {

// The (out, in) weight `layer` computes with, as one tensor of `dtype` on the layer's device: a Linear's
// weight, an NF4Linear's dequantised weight, or a LoraLinear's base weight + scaling * B @ A (unless the
// adapter is merged already). The sum is computed in f32 (f64 for an f64 base) and rounded once to dtype.
// Other layer types are an error naming the type.
Tensor plain_weight(const LinearBase& layer, DType dtype);
// The layer's bias (of the base for a LoraLinear) cast to dtype, or an undefined tensor.
Tensor plain_bias(const LinearBase& layer, DType dtype);

// peft's merge_and_unload: every LoraLinear and NF4Linear below `root` becomes a Linear holding its
// plain weight (and bias) in `dtype`, frozen. Returns how many layers were replaced.
int64_t merge_and_unload(Module& root, DType dtype);

// One tensor of the model's plain checkpoint: its state-dict key (a LoraLinear at path P gives P.weight
// and P.bias, as the merged Linear would), its shape, and how to compute it in a dtype. `get` reads the
// live model: valid while the model is alive and unchanged.
struct PlainTensor {
  std::string key;
  Shape shape;
  std::function<Tensor(DType dtype)> get;
};
// Every tensor of `root`'s checkpoint with linears made plain, sorted by key, each computed only when
// asked for (a merged weight exists only while the caller holds it). Floating tensors are cast to the
// asked dtype; others keep theirs. With `nf4_as_bnb`, NF4Linear weights stay quantised as a bnb-4bit
// checkpoint stores them (quant/bnb_checkpoint.h: W, W.absmax, ..., W.quant_state.bitsandbytes__nf4,
// whatever dtype is asked), and a LoraLinear is an error.
std::vector<PlainTensor> plain_tensors(Module& root, bool nf4_as_bnb = false);

}  // namespace kiln::nn

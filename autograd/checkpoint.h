// Activation checkpointing: run `fn` without keeping its activations, and recompute them in
// backward. Pass every tensor that needs a gradient and is not a leaf (parameters may be captured
// by the closure). The default generator's state is restored for the recompute, so dropout inside
// `fn` draws the same mask twice.
#pragma once
#include <functional>
#include <vector>

#include "core/tensor.h"

namespace kiln::autograd {

using CheckpointFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs);

}  // namespace kiln::autograd

// Activation checkpointing: run `fn` without keeping its activations, and recompute them in
// backward. Pass every tensor that needs a gradient and is not a leaf (parameters may be captured
// by the closure). The default generator's state is restored for the recompute, so dropout inside
// `fn` draws the same mask twice.
//
// With `offload`, the inputs wait in host memory instead of on the device (core/offload.h): the copy
// down overlaps the forward, and when an offloaded checkpoint's backward starts it fetches its own
// inputs and starts bringing back those of the offloaded checkpoint made just before it in forward
// (on this thread), so a stack of layers overlaps each copy back with the layer above's backward.
#pragma once
#include <functional>
#include <vector>

#include "core/tensor.h"

namespace kiln::autograd {

using CheckpointFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

struct CheckpointOptions {
  bool offload = false;  // keep the inputs in (pinned) host memory until backward
};

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options = {});

}  // namespace kiln::autograd

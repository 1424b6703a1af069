// Hooks into backward, for what must act as soon as gradients exist: FSDP reduce-scatters a layer's
// gradients while backward goes on; optimisers can step in backward; a final callback waits for
// collectives. Hooks run on the thread running backward, with grad mode off.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/hook_handle.h"
#include "core/tensor.h"

namespace kiln::autograd {

using PostAccumulateGradHook = std::function<void(const Tensor& leaf)>;

// Runs `hook(leaf)` once per backward that accumulates into `leaf`'s .grad, after every contribution
// of that backward reached it (with gradient accumulation, .grad then holds the running sum). Leaves
// inside a checkpointed block complete when the block's recomputed backward ends; a leaf reached by
// several checkpointed blocks in one backward (one weight shared between blocks) gets one call per block.
// autograd::grad() accumulates nothing and runs no hook. `leaf` must require grad and have no grad_fn.
HookHandle register_post_accumulate_grad_hook(const Tensor& leaf, PostAccumulateGradHook hook);

// Queues `fn` to run once when the outermost running backward ends, after every hook (callbacks may
// queue more). Called outside a backward, it is an error. If the backward throws, queued callbacks
// are dropped.
void queue_callback(std::function<void()> fn);

// The per-leaf hook list (held by TensorImpl::grad_hooks).
struct GradHooks {
  struct Entry {
    uint64_t id;
    PostAccumulateGradHook fn;
  };
  std::vector<Entry> entries;
  uint64_t next_id = 0;
};

}  // namespace kiln::autograd

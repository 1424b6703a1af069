// checkpoint() as a custom Function: forward under no_grad, backward = recompute with grad on, then
// a nested backward through the recomputed graph.
#include "autograd/checkpoint.h"

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/offload.h"
#include "core/random.h"

namespace kiln::autograd {
namespace {

// An offloaded checkpoint's inputs, linked to the one made before it in forward.
struct Offloaded {
  std::vector<std::unique_ptr<OffloadedTensor>> inputs;
  std::weak_ptr<Offloaded> previous;
  bool fetched = false;
  void prefetch() {
    for (auto& t : inputs) t->prefetch();
  }
};
// The offloaded checkpoint this thread made last (what the next one links to).
thread_local std::weak_ptr<Offloaded> last_offloaded;

class Checkpoint final : public Function {
 public:
  Checkpoint(CheckpointFn fn, CheckpointOptions options) : fn_(std::move(fn)), options_(options) {}
  const char* name() const override { return "checkpoint"; }

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override {
    rng_ = default_generator().state();
    for (const Tensor& t : inputs) requires_.push_back(t.requires_grad());
    if (!options_.offload) {
      save_for_backward(inputs);
      return fn_(inputs);
    }
    // The copies down are queued first, so they overlap with fn's own kernels.
    offloaded_ = std::make_shared<Offloaded>();
    for (const Tensor& t : inputs) offloaded_->inputs.push_back(std::make_unique<OffloadedTensor>(t));
    offloaded_->previous = last_offloaded;
    last_offloaded = offloaded_;
    return fn_(inputs);
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) override {
    std::vector<Tensor> inputs;
    if (offloaded_) {
      KILN_CHECK(!offloaded_->fetched, "checkpoint",
                 "an offloaded checkpoint's backward ran twice: the first released its inputs");
      for (auto& t : offloaded_->inputs) inputs.push_back(t->fetch());
      offloaded_->inputs.clear();
      offloaded_->fetched = true;
      if (auto previous = offloaded_->previous.lock()) previous->prefetch();
    } else {
      inputs = saved();
    }
    std::vector<Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Tensor t = inputs[i].detach();
      if (requires_[i]) t.set_requires_grad(true);
      leaves.push_back(t);
    }
    std::vector<Tensor> outs;
    {
      GeneratorState now = default_generator().state();
      default_generator().set_state(rng_);
      EnableGradGuard grad_on;
      try {
        outs = fn_(leaves);
      } catch (...) {
        default_generator().set_state(now);
        throw;
      }
      default_generator().set_state(now);
    }
    std::vector<Tensor> roots, seeds;
    for (size_t i = 0; i < outs.size() && i < grad_outputs.size(); ++i) {
      if (outs[i].requires_grad()) { roots.push_back(outs[i]); seeds.push_back(grad_outputs[i]); }
    }
    if (!roots.empty()) autograd::backward(roots, seeds);
    std::vector<Tensor> grads;
    for (const Tensor& l : leaves) grads.push_back(l.requires_grad() ? l.grad() : Tensor());
    return grads;
  }

 private:
  CheckpointFn fn_;
  CheckpointOptions options_;
  std::shared_ptr<Offloaded> offloaded_;  // with options_.offload
  GeneratorState rng_;
  std::vector<bool> requires_;
};

}  // namespace

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options) {
  return autograd::apply(std::make_shared<Checkpoint>(std::move(fn), options), inputs, /*always_record=*/true);
}

}  // namespace kiln::autograd

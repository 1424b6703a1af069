// checkpoint() as a custom Function: forward under no_grad, backward = recompute with grad on, then
// a nested backward through the recomputed graph.
#include "autograd/checkpoint.h"

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/random.h"

namespace kiln::autograd {
namespace {

class Checkpoint final : public Function {
 public:
  explicit Checkpoint(CheckpointFn fn) : fn_(std::move(fn)) {}
  const char* name() const override { return "checkpoint"; }

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override {
    rng_ = default_generator().state();
    for (const Tensor& t : inputs) requires_.push_back(t.requires_grad());
    save_for_backward(inputs);
    return fn_(inputs);
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) override {
    std::vector<Tensor> leaves;
    for (size_t i = 0; i < saved().size(); ++i) {
      Tensor t = saved()[i].detach();
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
  GeneratorState rng_;
  std::vector<bool> requires_;
};

}  // namespace

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs) {
  return autograd::apply(std::make_shared<Checkpoint>(std::move(fn)), inputs, /*always_record=*/true);
}

}  // namespace kiln::autograd

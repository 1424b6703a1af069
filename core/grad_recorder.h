// What the dispatch point needs from autograd, as an interface core owns and autograd implements
// (autograd/recorder.cpp installs it through KILN_REGISTER). Without the autograd library linked,
// no history is recorded and Tensor::backward() is an error.
#pragma once
#include <vector>

#include "core/primitive.h"

namespace kiln {

class GradRecorder {
 public:
  virtual ~GradRecorder() = default;
  // Grad mode on this thread (autograd::NoGradGuard turns it off).
  virtual bool enabled() const = 0;
  // Called by dispatch after a differentiable op ran with grad mode on and an input requiring grad.
  virtual void record(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) = 0;
  // Tensor::backward().
  virtual void backward(const Tensor& root, const Tensor& grad, bool retain_graph, bool create_graph) = 0;
};

void set_grad_recorder(GradRecorder* recorder);
GradRecorder* grad_recorder();  // null when autograd is not linked
// grad_recorder() && grad_recorder()->enabled()
bool grad_recording();

}  // namespace kiln

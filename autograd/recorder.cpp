// autograd's side of the dispatch point: the GradRecorder core calls (grad mode, recording a node,
// Tensor::backward), installed through the one registration mechanism (core/registry.h).
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "core/grad_recorder.h"
#include "core/registry.h"

namespace kiln::autograd {
namespace {

class Recorder final : public GradRecorder {
 public:
  bool enabled() const override { return grad_enabled(); }
  void record(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    autograd::record(op, inputs, outputs);
  }
  void backward(const Tensor& root, const Tensor& grad, bool retain_graph, bool create_graph) override {
    autograd::backward({root}, {grad}, retain_graph, create_graph);
  }
};

}  // namespace

KILN_REGISTER(autograd_recorder) {
  static Recorder recorder;
  set_grad_recorder(&recorder);
}

}  // namespace kiln::autograd

// Custom Functions enter the graph as a primitive whose vjp calls the user's backward.
#include "autograd/function.h"

#include <unordered_set>

#include "autograd/grad_mode.h"
#include "autograd/node.h"

namespace kiln::autograd {

class FunctionPrimitive final : public Primitive {
 public:
  explicit FunctionPrimitive(std::shared_ptr<Function> fn) : fn_(std::move(fn)) {}
  const char* name() const override { return fn_->name(); }
  // A custom Function is opaque: two nodes are the same op only when they call the same Function object.
  std::vector<Attr> attrs() const override { return {{"fn", ObjectAttr{fn_.get()}}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>&) const override {
    KILN_FAIL(fn_->name(), "custom functions run through autograd::apply, not dispatch");
  }
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& in, const std::vector<Tensor>& out, const std::vector<Tensor>& cot,
                          const std::vector<bool>& wanted) const override {
    std::vector<Tensor> none(wanted.size());
    return vjp_accumulating(in, out, cot, wanted, none);
  }
  std::vector<Tensor> vjp_accumulating(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                       const std::vector<Tensor>& cot, const std::vector<bool>& wanted,
                                       std::vector<Tensor>& addends) const override {
    KILN_CHECK(!fn_->released_, fn_->name(),
               "backward called a second time, but the saved tensors were freed by the first backward; pass "
               "retain_graph=true to the first backward");
    fn_->needs_input_grad_ = wanted;
    std::vector<Tensor> g = fn_->backward_accumulating(cot, addends);
    KILN_CHECK(g.size() == wanted.size(), fn_->name(), "backward returned {} gradients for {} inputs", g.size(),
               wanted.size());
    return g;
  }
  void release_saved() const override {
    fn_->saved_.clear();
    fn_->released_ = true;
  }
  const Function& function() const { return *fn_; }

 private:
  std::shared_ptr<Function> fn_;
};

void Function::save_for_backward(std::vector<Tensor> tensors) { saved_ = std::move(tensors); }

const std::vector<Tensor>& Function::saved() const {
  KILN_CHECK(!released_, name(), "saved tensors were freed by a previous backward; pass retain_graph=true to it");
  return saved_;
}

namespace {
thread_local FunctionObserver* t_function_observer = nullptr;
}  // namespace

FunctionObserverScope::FunctionObserverScope(FunctionObserver* observer) : previous_(t_function_observer) {
  t_function_observer = observer;
}
FunctionObserverScope::~FunctionObserverScope() { t_function_observer = previous_; }

std::vector<Tensor> apply(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& inputs, bool always_record) {
  std::vector<Tensor> outputs;
  FunctionObserver* observer = t_function_observer;
  if (observer) observer->before_forward(fn, inputs);
  try {
    NoGradGuard no_grad;
    outputs = fn->forward(inputs);
  } catch (...) {
    if (observer) observer->after_forward(fn, {});
    throw;
  }
  if (observer) observer->after_forward(fn, outputs);
  // Fresh handles, so an output that is an input (or aliases one) gets its own history.
  for (Tensor& o : outputs) {
    KILN_CHECK(o.defined(), fn->name(), "forward returned an undefined tensor");
    o = o.detach();
  }
  bool any = always_record;
  for (const Tensor& t : inputs) any = any || t.requires_grad();
  if (grad_enabled() && any) record(std::make_shared<FunctionPrimitive>(fn), inputs, outputs);
  return outputs;
}

const char* untraceable_function(const std::vector<Tensor>& outputs, uint64_t since) {
  std::vector<const Node*> stack;
  std::unordered_set<const Node*> seen;
  auto visit = [&](const Node* n) {
    if (n != nullptr && n->sequence >= since && seen.insert(n).second) stack.push_back(n);
  };
  for (const Tensor& t : outputs)
    if (t.defined()) visit(t.grad_fn().get());
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    if (const auto* f = dynamic_cast<const FunctionPrimitive*>(n->op.get()); f && !f->function().traceable_backward())
      return f->function().name();
    for (const Edge& e : n->edges) visit(e.node.get());
  }
  return nullptr;
}

}  // namespace kiln::autograd

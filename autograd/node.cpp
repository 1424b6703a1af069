// Recording a node for an op that ran with grad mode on.
#include "autograd/node.h"

#include <atomic>

namespace kiln::autograd {
namespace {
std::atomic<uint64_t> g_sequence{0};

Tensor save(const Tensor& t, bool keep_history, std::vector<uint64_t>& versions) {
  versions.push_back(t.defined() && t.storage() ? t.storage()->version() : 0);
  if (!t.defined()) return t;
  return keep_history ? t : t.detach();
}
}  // namespace

Node::~Node() {
  std::vector<std::shared_ptr<Node>> pending;
  auto detach_children = [&pending](Node& n) {
    for (Edge& e : n.edges) {
      if (e.node) pending.push_back(std::move(e.node));
    }
    for (Tensor& t : n.saved_inputs) {
      const std::shared_ptr<TensorImpl>& impl = t.impl();
      if (impl && impl.use_count() == 1 && impl->grad_fn) pending.push_back(std::move(impl->grad_fn));
    }
    n.edges.clear();
    n.saved_inputs.clear();
  };
  detach_children(*this);
  while (!pending.empty()) {
    std::shared_ptr<Node> n = std::move(pending.back());
    pending.pop_back();
    if (n.use_count() == 1) detach_children(*n);
  }
}

uint64_t next_node_sequence() { return g_sequence.load(); }

void record(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  auto node = std::make_shared<Node>();
  node->op = op;
  node->sequence = g_sequence.fetch_add(1);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    node->input_meta.push_back({t.shape(), t.dtype(), t.device()});
    Edge e;
    if (t.requires_grad()) {
      if (t.grad_fn()) {
        e.node = t.grad_fn();
        e.output_nr = t.impl()->output_nr;
      } else {
        e.leaf = t.impl();
      }
    }
    node->edges.push_back(std::move(e));
    if (op->vjp_needs_inputs())
      node->saved_inputs.push_back(save(op->vjp_needs_input(i) ? t : Tensor(), true, node->saved_versions));
  }
  for (const Tensor& t : outputs) {
    node->output_meta.push_back({t.shape(), t.dtype(), t.device()});
    if (op->vjp_needs_outputs()) node->saved_outputs.push_back(save(t, false, node->saved_versions));
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    TensorImpl& o = *outputs[i].impl();
    if (!is_floating(o.dtype)) continue;
    o.requires_grad = true;
    o.grad_fn = node;
    o.output_nr = static_cast<int>(i);
  }
}

}  // namespace kiln::autograd

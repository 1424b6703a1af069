// The reverse-mode engine. Nodes are processed in decreasing creation order, which is a valid
// topological order: every node's inputs were made before it.
#include "autograd/engine.h"

#include <algorithm>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "autograd/hooks.h"
#include "autograd/node.h"
#include "core/ops.h"

namespace kiln::autograd {
namespace {

// Backward runs nest (checkpoint recomputes and runs a backward inside a vjp); callbacks queued in any
// of them run when the outermost ends.
thread_local int t_backward_depth = 0;
thread_local std::vector<std::function<void()>> t_callbacks;

void run_leaf_hooks(const std::shared_ptr<TensorImpl>& leaf) {
  if (!leaf->grad_hooks) return;
  std::vector<GradHooks::Entry> entries = leaf->grad_hooks->entries;  // a hook may remove itself
  Tensor t(leaf);
  NoGradGuard no_grad;
  for (const GradHooks::Entry& e : entries) e.fn(t);
}

// Marks a backward as running on this thread; the outermost one runs the queued callbacks at its end
// (or drops them when it throws).
class BackwardScope {
 public:
  BackwardScope() { ++t_backward_depth; }
  ~BackwardScope() {
    if (--t_backward_depth == 0) t_callbacks.clear();
  }
  void finish() {
    if (t_backward_depth != 1) return;
    while (!t_callbacks.empty()) {
      std::vector<std::function<void()>> now;
      now.swap(t_callbacks);
      NoGradGuard no_grad;
      for (auto& fn : now) fn();
    }
  }
};

Tensor accumulate(const Tensor& a, const Tensor& b) { return a.defined() ? add(a, b) : b; }

struct Run {
  bool retain_graph = false;
  bool create_graph = false;
  bool accumulate_leaves = true;
  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  // grad(): where the wanted gradients are caught
  std::map<std::pair<Node*, int>, Tensor> caught_nodes;
  std::unordered_map<TensorImpl*, Tensor> caught_leaves;
  // Leaves with post-accumulate-grad hooks: nodes still to process that have an edge into them, and
  // whether this run accumulated anything into them yet.
  std::unordered_map<TensorImpl*, int> leaf_pending;
  std::unordered_set<TensorImpl*> leaf_touched;

  void to_leaf(const std::shared_ptr<TensorImpl>& leaf, const Tensor& g) {
    auto it = caught_leaves.find(leaf.get());
    if (it != caught_leaves.end()) it->second = accumulate(it->second, g);
    if (!accumulate_leaves) return;
    if (leaf->grad_hooks) leaf_touched.insert(leaf.get());
    Tensor gd = create_graph ? g : g.detach();
    leaf->grad = leaf->grad ? accumulate(Tensor(leaf->grad), gd).impl() : gd.impl();
  }

  void to_edge(const Edge& e, const Tensor& g) {
    if (e.leaf) { to_leaf(e.leaf, g); return; }
    auto it = caught_nodes.find({e.node.get(), e.output_nr});
    if (it != caught_nodes.end()) it->second = accumulate(it->second, g);
    auto& buf = buffers[e.node.get()];
    if (buf.empty()) buf.resize(e.node->output_meta.size());
    buf[static_cast<size_t>(e.output_nr)] = accumulate(buf[static_cast<size_t>(e.output_nr)], g);
  }

  // For each wanted input of `n`: the gradient gathered so far for the node output it came from, when
  // the vjp may add its own to it (not with create_graph, not where grad() catches it, once per output).
  std::vector<Tensor> gathered(const Node& n, const std::vector<bool>& wanted) {
    std::vector<Tensor> out(n.edges.size());
    if (create_graph) return out;
    for (size_t i = 0; i < n.edges.size(); ++i) {
      const Edge& e = n.edges[i];
      if (!wanted[i] || !e.node || caught_nodes.count({e.node.get(), e.output_nr})) continue;
      bool repeated = false;
      for (size_t j = 0; j < i; ++j)
        repeated |= n.edges[j].node == e.node && n.edges[j].output_nr == e.output_nr;
      if (repeated) continue;
      auto it = buffers.find(e.node.get());
      if (it == buffers.end() || it->second.empty()) continue;
      const Tensor& g = it->second[static_cast<size_t>(e.output_nr)];
      if (g.defined() && g.dtype() == n.input_meta[i].dtype) out[i] = g;
    }
    return out;
  }

  void process(Node& n) {
    auto it = buffers.find(&n);
    if (it == buffers.end()) return;
    std::vector<Tensor> cot = std::move(it->second);
    buffers.erase(it);
    const bool had_saved = !n.saved_inputs.empty() || !n.saved_outputs.empty();
    KILN_CHECK(!n.released || !had_saved, "backward",
               "trying to backward through {} a second time, but its saved tensors were freed by the first backward; "
               "pass retain_graph=true to the first backward", n.op->name());
    KILN_CHECK(!n.released, "backward",
               "trying to backward through {} a second time after its graph was freed; pass retain_graph=true to the "
               "first backward", n.op->name());
    size_t vi = 0;
    for (const auto* saved : {&n.saved_inputs, &n.saved_outputs}) {
      for (const Tensor& t : *saved) {
        KILN_CHECK(!t.defined() || !t.storage() || t.storage()->version() == n.saved_versions[vi], "backward",
                   "a tensor saved by {} for backward was modified in place after it was saved", n.op->name());
        ++vi;
      }
    }
    for (size_t i = 0; i < cot.size(); ++i) {
      if (!cot[i].defined()) cot[i] = zeros(n.output_meta[i].shape, n.output_meta[i].dtype, n.output_meta[i].device);
    }
    std::vector<Tensor> outputs = n.saved_outputs;
    if (create_graph) {  // reattach the saved outputs to this node so the vjp itself is differentiable
      for (size_t i = 0; i < outputs.size(); ++i) {
        if (!is_floating(outputs[i].dtype())) continue;
        outputs[i] = outputs[i].detach();
        outputs[i].impl()->requires_grad = true;
        outputs[i].impl()->grad_fn = n.shared_from_this();
        outputs[i].impl()->output_nr = static_cast<int>(i);
      }
    }
    std::vector<bool> wanted;
    for (const Edge& e : n.edges) wanted.push_back(e.active());
    std::vector<Tensor> addends = gathered(n, wanted);
    std::vector<bool> offered;
    for (const Tensor& a : addends) offered.push_back(a.defined());
    std::vector<Tensor> grads;
    {
      bool prev = grad_enabled();
      set_grad_enabled(create_graph);
      try {
        grads = n.op->vjp_accumulating(n.saved_inputs, outputs, cot, wanted, addends);
      } catch (...) {
        set_grad_enabled(prev);
        throw;
      }
      set_grad_enabled(prev);
    }
    KILN_CHECK(grads.size() == n.edges.size(), "backward", "vjp of {} returned {} gradients for {} inputs",
               n.op->name(), grads.size(), n.edges.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!wanted[i] || !grads[i].defined()) continue;
      const TensorMeta& m = n.input_meta[i];
      KILN_CHECK(grads[i].shape() == m.shape, "backward", "vjp of {} gave input {} a gradient of shape {}, expected {}",
                 n.op->name(), i, shape_str(grads[i].shape()), shape_str(m.shape));
      Tensor g = grads[i].dtype() == m.dtype ? grads[i] : cast(grads[i], m.dtype);
      if (offered[i] && !addends[i].defined()) {  // the op summed it with what was gathered
        buffers[n.edges[i].node.get()][static_cast<size_t>(n.edges[i].output_nr)] = g;
        continue;
      }
      to_edge(n.edges[i], g);
    }
    if (!retain_graph) {
      n.released = true;
      n.saved_inputs.clear();
      n.saved_outputs.clear();
      n.op->release_saved();
    }
  }

  void execute(const std::vector<Tensor>& roots, const std::vector<Tensor>& seeds) {
    std::vector<Node*> order;
    std::unordered_set<Node*> seen;
    std::vector<Node*> stack;
    for (size_t i = 0; i < roots.size(); ++i) {
      const Tensor& r = roots[i];
      if (!r.grad_fn()) { to_leaf(r.impl(), seeds[i]); continue; }
      to_edge(Edge{r.grad_fn(), r.impl()->output_nr, nullptr}, seeds[i]);
      if (seen.insert(r.grad_fn().get()).second) stack.push_back(r.grad_fn().get());
    }
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      order.push_back(n);
      for (const Edge& e : n->edges) {
        if (e.node && seen.insert(e.node.get()).second) stack.push_back(e.node.get());
      }
    }
    std::sort(order.begin(), order.end(), [](Node* a, Node* b) { return a->sequence > b->sequence; });
    if (accumulate_leaves) {
      for (Node* n : order) {
        for (const Edge& e : n->edges) {
          if (e.leaf && e.leaf->grad_hooks) ++leaf_pending[e.leaf.get()];
        }
      }
      for (const Tensor& r : roots) {  // a root that is itself a leaf is complete once seeded
        if (!r.grad_fn()) leaf_done(r.impl(), /*from_node=*/false);
      }
    }
    for (Node* n : order) {
      process(*n);
      if (!accumulate_leaves) continue;
      for (const Edge& e : n->edges) {
        if (e.leaf && e.leaf->grad_hooks) leaf_done(e.leaf, /*from_node=*/true);
      }
    }
  }

  // One contributor of `leaf` is done; its hooks run when none is left and something reached it.
  void leaf_done(const std::shared_ptr<TensorImpl>& leaf, bool from_node) {
    if (!leaf->grad_hooks) return;
    int& pending = leaf_pending[leaf.get()];
    if (from_node) --pending;
    if (pending > 0 || !leaf_touched.count(leaf.get())) return;
    leaf_touched.erase(leaf.get());
    run_leaf_hooks(leaf);
  }
};

std::vector<Tensor> seeds_for(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs) {
  KILN_CHECK(grad_outputs.empty() || grad_outputs.size() == outputs.size(), "backward",
             "{} outputs but {} gradients given", outputs.size(), grad_outputs.size());
  std::vector<Tensor> seeds;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const Tensor& o = outputs[i];
    KILN_CHECK(o.defined(), "backward", "output {} is an undefined tensor", i);
    KILN_CHECK(o.requires_grad(), "backward",
               "output {} does not require grad and has no grad_fn (was it computed under no_grad?)", i);
    Tensor g = grad_outputs.empty() ? Tensor() : grad_outputs[i];
    if (!g.defined()) {
      KILN_CHECK(o.numel() == 1, "backward", "grad can be implicit only for one-element outputs; output {} has shape {}",
                 i, shape_str(o.shape()));
      g = ones_like(o);
    }
    KILN_CHECK(g.shape() == o.shape(), "backward", "gradient of shape {} given for output {} of shape {}",
               shape_str(g.shape()), i, shape_str(o.shape()));
    KILN_CHECK(g.device() == o.device(), "backward", "gradient on {} given for output {} on {}", g.device().str(), i,
               o.device().str());
    seeds.push_back(g.dtype() == o.dtype() ? g : cast(g, o.dtype()));
  }
  return seeds;
}

}  // namespace

void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs, bool retain_graph,
              bool create_graph) {
  std::vector<Tensor> seeds = seeds_for(outputs, grad_outputs);
  BackwardScope scope;
  Run run;
  run.retain_graph = retain_graph || create_graph;
  run.create_graph = create_graph;
  run.execute(outputs, seeds);
  scope.finish();
}

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs, bool retain_graph, bool create_graph) {
  std::vector<Tensor> seeds = seeds_for(outputs, grad_outputs);
  Run run;
  run.retain_graph = retain_graph || create_graph;
  run.create_graph = create_graph;
  run.accumulate_leaves = false;
  BackwardScope scope;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    KILN_CHECK(x.defined() && x.requires_grad(), "grad", "input {} does not require grad", i);
    if (x.grad_fn()) run.caught_nodes[{x.grad_fn().get(), x.impl()->output_nr}] = Tensor();
    else run.caught_leaves[x.impl().get()] = Tensor();
  }
  run.execute(outputs, seeds);
  scope.finish();
  std::vector<Tensor> out;
  for (const Tensor& x : inputs) {
    Tensor g = x.grad_fn() ? run.caught_nodes[{x.grad_fn().get(), x.impl()->output_nr}] : run.caught_leaves[x.impl().get()];
    out.push_back(g.defined() ? g : zeros_like(x));
  }
  return out;
}

}  // namespace kiln::autograd

namespace kiln::autograd {

HookHandle register_post_accumulate_grad_hook(const Tensor& leaf, PostAccumulateGradHook hook) {
  KILN_CHECK(leaf.defined() && leaf.requires_grad() && !leaf.grad_fn(), "register_post_accumulate_grad_hook",
             "expected a leaf tensor that requires grad{}", leaf.defined() && leaf.grad_fn() ? " (found a non-leaf)" : "");
  KILN_CHECK(static_cast<bool>(hook), "register_post_accumulate_grad_hook", "the hook is empty");
  TensorImpl& impl = *leaf.impl();
  if (!impl.grad_hooks) impl.grad_hooks = std::make_shared<GradHooks>();
  const uint64_t id = impl.grad_hooks->next_id++;
  impl.grad_hooks->entries.push_back({id, std::move(hook)});
  std::weak_ptr<GradHooks> weak = impl.grad_hooks;
  return HookHandle([weak, id] {
    if (auto h = weak.lock()) std::erase_if(h->entries, [id](const GradHooks::Entry& e) { return e.id == id; });
  });
}

void queue_callback(std::function<void()> fn) {
  KILN_CHECK(t_backward_depth > 0, "queue_callback", "called outside a backward");
  t_callbacks.push_back(std::move(fn));
}

}  // namespace kiln::autograd

// Dead-code and common-subexpression elimination and the add-into-GEMM fold over compile graphs.
#include "compile/passes.h"

#include <unordered_map>

#include "compile/fusion.h"
#include "compile/signature.h"
#include "core/ops/elementwise.h"
#include "core/ops/matmul.h"

namespace kiln::compile {
namespace {

// A copy of `g` with the nodes where keep[n] is true, reading replace[v] for each value v. A node with
// a swap (swap[n].op set) is written as that primitive over those inputs and origin, with n's outputs.
Rewrite rebuild(const Graph& g, const std::vector<bool>& keep, const std::vector<int>& replace,
                const std::vector<Node>& swap = {}) {
  Rewrite r;
  r.value_map.assign(g.values.size(), -1);
  for (int v : g.inputs) {
    const Value& val = g.values[static_cast<size_t>(v)];
    r.value_map[static_cast<size_t>(v)] = r.graph.add_input(val.meta, val.input, val.origin, val.requires_grad);
  }
  auto mapped = [&](int v) { return r.value_map[static_cast<size_t>(replace[static_cast<size_t>(v)])]; };
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    if (!keep[n]) continue;
    const Node& node = g.nodes[n];
    const Node& emit = n < swap.size() && swap[n].op ? swap[n] : node;
    std::vector<int> ins;
    for (int v : emit.inputs) ins.push_back(mapped(v));
    std::vector<TensorMeta> metas;
    std::vector<Origin> origins;
    for (int v : node.outputs) {
      metas.push_back(g.values[static_cast<size_t>(v)].meta);
      origins.push_back(g.values[static_cast<size_t>(v)].origin);
    }
    const int id = r.graph.add_node(emit.op, std::move(ins), metas, emit.origin, origins);
    for (size_t i = 0; i < node.outputs.size(); ++i)
      r.value_map[static_cast<size_t>(node.outputs[i])] = r.graph.nodes[static_cast<size_t>(id)].outputs[i];
  }
  for (size_t v = 0; v < g.values.size(); ++v)
    if (replace[v] != static_cast<int>(v)) r.value_map[v] = mapped(static_cast<int>(v));
  for (int v : g.outputs) r.graph.outputs.push_back(mapped(v));
  return r;
}

std::vector<int> identity(size_t n) {
  std::vector<int> m(n);
  for (size_t i = 0; i < n; ++i) m[i] = static_cast<int>(i);
  return m;
}

}  // namespace

Rewrite eliminate_dead_code(const Graph& g, const std::vector<int>& roots) {
  std::vector<bool> live_value = g.escaping(roots);
  std::vector<bool> keep(g.nodes.size(), false);
  for (size_t n = g.nodes.size(); n-- > 0;) {
    for (int v : g.nodes[n].outputs) keep[n] = keep[n] || live_value[static_cast<size_t>(v)];
    if (keep[n])
      for (int v : g.nodes[n].inputs) live_value[static_cast<size_t>(v)] = true;
  }
  return rebuild(g, keep, identity(g.values.size()));
}

Rewrite eliminate_common_subexpressions(const Graph& g) {
  std::vector<int> replace = identity(g.values.size());
  std::vector<bool> keep(g.nodes.size(), true);
  std::unordered_multimap<uint64_t, int> seen;  // hash of (primitive, inputs) -> node
  std::vector<std::pair<Origin, Origin>> merged;
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    const Node& node = g.nodes[n];
    std::vector<int> ins;
    uint64_t h = node.op->hash();
    for (int v : node.inputs) {
      ins.push_back(replace[static_cast<size_t>(v)]);
      h = hash_combine(h, static_cast<uint64_t>(ins.back()));
    }
    int found = -1;
    auto [b, e] = seen.equal_range(h);
    for (auto it = b; it != e && found < 0; ++it) {
      const Node& other = g.nodes[static_cast<size_t>(it->second)];
      if (other.outputs.size() != node.outputs.size() || other.inputs.size() != ins.size()) continue;
      bool same = other.op->equals(*node.op);
      for (size_t i = 0; same && i < ins.size(); ++i) same = replace[static_cast<size_t>(other.inputs[i])] == ins[i];
      if (same) found = it->second;
    }
    if (found < 0) {
      seen.emplace(h, static_cast<int>(n));
      continue;
    }
    keep[n] = false;
    const Node& rep = g.nodes[static_cast<size_t>(found)];
    for (size_t i = 0; i < node.outputs.size(); ++i) replace[static_cast<size_t>(node.outputs[i])] = rep.outputs[i];
    merged.emplace_back(rep.origin, node.origin);
  }
  Rewrite r = rebuild(g, keep, replace);
  r.merged = std::move(merged);
  return r;
}

Rewrite fold_adds_into_matmuls(const Graph& g, const std::vector<bool>& escapes) {
  const std::vector<std::vector<int>> users = g.users();
  auto is_add = [](const Node& n) {
    const auto* b = dynamic_cast<const prim::Binary*>(n.op.get());
    return b != nullptr && b->op() == BinaryOp::add && n.inputs.size() == 2;
  };
  auto same_meta = [&](int a, int b) {
    const TensorMeta& x = g.values[static_cast<size_t>(a)].meta;
    const TensorMeta& y = g.values[static_cast<size_t>(b)].meta;
    return x.shape == y.shape && x.dtype == y.dtype && x.device == y.device;
  };
  // The matmul node an add can absorb through its input `v`, or -1.
  std::vector<bool> absorbed(g.nodes.size(), false);
  auto foldable = [&](int v) {
    const Value& val = g.values[static_cast<size_t>(v)];
    if (val.producer < 0 || absorbed[static_cast<size_t>(val.producer)] || escapes[static_cast<size_t>(v)]) return -1;
    const Node& m = g.nodes[static_cast<size_t>(val.producer)];
    if (!dynamic_cast<const prim::Matmul*>(m.op.get()) || m.inputs.size() != 2 || users[static_cast<size_t>(v)].size() != 1)
      return -1;
    return val.producer;
  };
  // Whether `v` comes from a kernel of its own (a graph input, a library op): an addend from pointwise work
  // stays in that work's fused group with the add instead (folding would cut the group in two).
  std::vector<int> fold_into(g.nodes.size(), -1);  // add node -> the matmul it absorbs
  auto stands_alone = [&](int v) {
    for (;;) {
      const int p = g.values[static_cast<size_t>(v)].producer;
      if (p < 0 || fold_into[static_cast<size_t>(p)] >= 0) return true;  // an input, or an add already folded
      const NodeKind k = classify(g, p);
      if (k != NodeKind::view) return k == NodeKind::library || k == NodeKind::unknown;
      v = g.nodes[static_cast<size_t>(p)].inputs[0];
    }
  };
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    const Node& add = g.nodes[n];
    if (!is_add(add) || add.origin.index < 0) continue;
    const int x = add.inputs[0], y = add.inputs[1], out = add.outputs[0];
    if (x == y || !same_meta(x, y) || !same_meta(x, out) || !is_floating(g.values[static_cast<size_t>(out)].meta.dtype))
      continue;
    const int px = stands_alone(y) ? foldable(x) : -1, py = stands_alone(x) ? foldable(y) : -1;
    const int m = std::max(px, py);  // the later product when both qualify
    if (m < 0) continue;
    fold_into[n] = m;
    absorbed[static_cast<size_t>(m)] = true;
  }

  // The add becomes the matmul (its primitive and origin) over (a, b, addend), at the add's place.
  std::vector<bool> keep(g.nodes.size(), true);
  std::vector<Node> swap(g.nodes.size());
  int folded = 0;
  std::vector<std::pair<Origin, Origin>> same_shape;
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    if (fold_into[n] < 0) continue;
    const Node& add = g.nodes[n];
    const Node& m = g.nodes[static_cast<size_t>(fold_into[n])];
    const int product = m.outputs[0];
    const int addend = add.inputs[0] == product ? add.inputs[1] : add.inputs[0];
    keep[static_cast<size_t>(fold_into[n])] = false;
    swap[n] = Node{m.op, {m.inputs[0], m.inputs[1], addend}, {}, m.origin};
    same_shape.emplace_back(g.values[static_cast<size_t>(product)].origin, g.values[static_cast<size_t>(addend)].origin);
    ++folded;
  }
  Rewrite r = rebuild(g, keep, identity(g.values.size()), swap);
  r.same_shape = std::move(same_shape);
  r.folded = folded;
  return r;
}

std::vector<int> compose(const std::vector<int>& a, const std::vector<int>& b) {
  std::vector<int> out(a.size(), -1);
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] >= 0 && static_cast<size_t>(a[i]) < b.size()) out[i] = b[static_cast<size_t>(a[i])];
  return out;
}

}  // namespace kiln::compile

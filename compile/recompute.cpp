// Choosing kept forward values and building the backward graph with recomputation.
#include "compile/recompute.h"

#include <algorithm>
#include <set>
#include <unordered_map>

#include "compile/fusion.h"
#include "compile/passes.h"

namespace kiln::compile {
namespace {

constexpr size_t kMaxRecompute = 32;  // forward nodes one saved value may pull into the backward

bool cheap(NodeKind k) { return k == NodeKind::pointwise || k == NodeKind::view || k == NodeKind::fill; }

// Forward values available in backward without keeping anything: inputs and outputs.
std::vector<bool> available(const Graph& f) {
  std::vector<bool> a(f.values.size(), false);
  for (int v : f.inputs) a[static_cast<size_t>(v)] = true;
  for (int v : f.outputs) a[static_cast<size_t>(v)] = true;
  return a;
}

// The saved forward values a backward graph reads after dead code is removed.
std::vector<int> saved_reads(const Graph& b) {
  Rewrite d = eliminate_dead_code(b);
  const std::vector<std::vector<int>> users = d.graph.users();
  std::vector<bool> escaping = d.graph.escaping();
  std::set<int> out;
  for (int v : d.graph.inputs) {
    const Value& val = d.graph.values[static_cast<size_t>(v)];
    if (val.input.kind == InputKind::saved && (!users[static_cast<size_t>(v)].empty() || escaping[static_cast<size_t>(v)]))
      out.insert(val.input.index);
  }
  return {out.begin(), out.end()};
}

// The forward nodes recomputing v from `have` (available or kept) values; false when too many or
// when one of them is not cheap.
bool recompute_cone(const Graph& f, int v, const std::vector<bool>& have, std::vector<int>& nodes) {
  std::vector<int> stack{v};
  std::set<int> seen;
  while (!stack.empty()) {
    const int x = stack.back();
    stack.pop_back();
    if (have[static_cast<size_t>(x)]) continue;
    const int p = f.values[static_cast<size_t>(x)].producer;
    if (p < 0 || !cheap(classify(f, p))) return false;
    if (!seen.insert(p).second) continue;
    if (seen.size() > kMaxRecompute) return false;
    for (int in : f.nodes[static_cast<size_t>(p)].inputs) stack.push_back(in);
  }
  nodes.assign(seen.begin(), seen.end());
  return true;
}

}  // namespace

std::vector<int> choose_kept(const Graph& forward, const Graph& backward) {
  const std::vector<int> saved = saved_reads(backward);
  std::vector<bool> have = available(forward);
  std::vector<int> kept;
  // First whatever is not cheap to make again: library and row ops, unknown ops.
  for (int s : saved) {
    if (have[static_cast<size_t>(s)]) continue;
    const int p = forward.values[static_cast<size_t>(s)].producer;
    if (!cheap(classify(forward, p))) {
      kept.push_back(s);
      have[static_cast<size_t>(s)] = true;
    }
  }
  // Then pointwise values: recomputed when their cone reaches only what is there anyway.
  std::vector<int> cone;
  for (int s : saved)
    if (!have[static_cast<size_t>(s)] && !recompute_cone(forward, s, have, cone)) {
      kept.push_back(s);
      have[static_cast<size_t>(s)] = true;
    }
  std::sort(kept.begin(), kept.end());
  return kept;
}

Graph backward_with_recompute(const Graph& forward, const Graph& backward, const std::vector<int>& kept) {
  Graph j;
  std::vector<bool> have = available(forward);
  for (int k : kept) have[static_cast<size_t>(k)] = true;
  std::unordered_map<int, int> fwd;  // forward value -> joint value
  std::vector<int> bwd(backward.values.size(), -1);
  std::vector<int> pending;          // saved inputs to recompute: (backward value, forward value)
  for (int v : backward.inputs) {
    const Value& val = backward.values[static_cast<size_t>(v)];
    if (val.input.kind == InputKind::saved && !have[static_cast<size_t>(val.input.index)]) {
      pending.push_back(v);
      continue;
    }
    bwd[static_cast<size_t>(v)] = j.add_input(val.meta, val.input, val.origin, val.requires_grad);
    if (val.input.kind == InputKind::saved) fwd[val.input.index] = bwd[static_cast<size_t>(v)];
  }
  // Recomputed forward nodes, in forward order; their own inputs are forward inputs or kept values.
  std::set<int> nodes;
  for (int v : pending) {
    std::vector<int> cone;
    const int s = backward.values[static_cast<size_t>(v)].input.index;
    if (!recompute_cone(forward, s, have, cone)) {
      // Not cheap (the backward was traced differently from the one the forward plan chose for):
      // recompute the whole cone, library ops included.
      cone.clear();
      std::vector<int> stack{s};
      while (!stack.empty()) {
        const int x = stack.back();
        stack.pop_back();
        const int p = forward.values[static_cast<size_t>(x)].producer;
        if (have[static_cast<size_t>(x)] || p < 0 || !nodes.insert(p).second) continue;
        for (int in : forward.nodes[static_cast<size_t>(p)].inputs) stack.push_back(in);
      }
    }
    nodes.insert(cone.begin(), cone.end());
  }
  auto joint_fwd = [&](int fv) {
    if (auto it = fwd.find(fv); it != fwd.end()) return it->second;
    const Value& val = forward.values[static_cast<size_t>(fv)];
    const int id = j.add_input(val.meta, {InputKind::saved, fv}, {0, fv});
    fwd[fv] = id;
    return id;
  };
  for (int n : nodes) {  // std::set: ascending, i.e. forward order
    const Node& node = forward.nodes[static_cast<size_t>(n)];
    std::vector<int> ins;
    for (int in : node.inputs) ins.push_back(joint_fwd(in));
    std::vector<TensorMeta> metas;
    std::vector<Origin> origins;
    for (int o : node.outputs) {
      metas.push_back(forward.values[static_cast<size_t>(o)].meta);
      origins.push_back({0, o});
    }
    const int id = j.add_node(node.op, std::move(ins), metas, node.origin, origins);
    for (size_t i = 0; i < node.outputs.size(); ++i) fwd[node.outputs[i]] = j.nodes[static_cast<size_t>(id)].outputs[i];
  }
  for (int v : pending) bwd[static_cast<size_t>(v)] = fwd.at(backward.values[static_cast<size_t>(v)].input.index);
  for (const Node& node : backward.nodes) {
    std::vector<int> ins;
    for (int in : node.inputs) ins.push_back(bwd[static_cast<size_t>(in)]);
    std::vector<TensorMeta> metas;
    std::vector<Origin> origins;
    for (int o : node.outputs) {
      metas.push_back(backward.values[static_cast<size_t>(o)].meta);
      origins.push_back(backward.values[static_cast<size_t>(o)].origin);
    }
    const int id = j.add_node(node.op, std::move(ins), metas, node.origin, origins);
    for (size_t i = 0; i < node.outputs.size(); ++i) bwd[static_cast<size_t>(node.outputs[i])] = j.nodes[static_cast<size_t>(id)].outputs[i];
  }
  for (int v : backward.outputs) j.outputs.push_back(bwd[static_cast<size_t>(v)]);
  return j;
}

}  // namespace kiln::compile

// Dead-code and common-subexpression elimination over compile graphs.
#include "compile/passes.h"

#include <unordered_map>

#include "compile/signature.h"

namespace kiln::compile {
namespace {

// A copy of `g` with the nodes where keep[n] is true, reading replace[v] for each value v.
Rewrite rebuild(const Graph& g, const std::vector<bool>& keep, const std::vector<int>& replace) {
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
    std::vector<int> ins;
    for (int v : node.inputs) ins.push_back(mapped(v));
    std::vector<TensorMeta> metas;
    std::vector<Origin> origins;
    for (int v : node.outputs) {
      metas.push_back(g.values[static_cast<size_t>(v)].meta);
      origins.push_back(g.values[static_cast<size_t>(v)].origin);
    }
    const int id = r.graph.add_node(node.op, std::move(ins), metas, node.origin, origins);
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

std::vector<int> compose(const std::vector<int>& a, const std::vector<int>& b) {
  std::vector<int> out(a.size(), -1);
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] >= 0 && static_cast<size_t>(a[i]) < b.size()) out[i] = b[static_cast<size_t>(a[i])];
  return out;
}

}  // namespace kiln::compile

// Graph construction, use lists and printing.
#include "compile/graph.h"

#include <fmt/format.h>

namespace kiln::compile {

const char* input_kind_name(InputKind k) {
  switch (k) {
    case InputKind::arg: return "arg";
    case InputKind::external: return "external";
    case InputKind::saved: return "saved";
    case InputKind::cotangent: return "cotangent";
  }
  return "input";
}

std::string meta_str(const TensorMeta& m) {
  if (m.device.is_cpu()) return fmt::format("{} {}", dtype_name(m.dtype), shape_str(m.shape));
  return fmt::format("{} {} {}", dtype_name(m.dtype), shape_str(m.shape), m.device.str());
}

bool broadcasts_to(const Shape& a, const Shape& target) {
  if (a.size() > target.size()) return false;
  const size_t lead = target.size() - a.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != 1 && a[i] != target[lead + i]) return false;
  return true;
}

int Graph::add_input(const TensorMeta& meta, InputRef ref, Origin origin, bool requires_grad) {
  Value v;
  v.meta = meta;
  v.input = ref;
  v.origin = origin;
  v.requires_grad = requires_grad;
  values.push_back(std::move(v));
  const int id = static_cast<int>(values.size()) - 1;
  inputs.push_back(id);
  return id;
}

int Graph::add_node(PrimitivePtr op, std::vector<int> ins, const std::vector<TensorMeta>& outs, Origin origin,
                    const std::vector<Origin>& output_origins) {
  Node n;
  n.op = std::move(op);
  n.inputs = std::move(ins);
  n.origin = origin;
  const int id = static_cast<int>(nodes.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    Value v;
    v.meta = outs[i];
    v.producer = id;
    v.output_nr = static_cast<int>(i);
    if (i < output_origins.size()) v.origin = output_origins[i];
    values.push_back(std::move(v));
    n.outputs.push_back(static_cast<int>(values.size()) - 1);
  }
  nodes.push_back(std::move(n));
  return id;
}

std::vector<std::vector<int>> Graph::users() const {
  std::vector<std::vector<int>> u(values.size());
  for (size_t n = 0; n < nodes.size(); ++n)
    for (int v : nodes[n].inputs)
      if (u[static_cast<size_t>(v)].empty() || u[static_cast<size_t>(v)].back() != static_cast<int>(n))
        u[static_cast<size_t>(v)].push_back(static_cast<int>(n));
  return u;
}

std::vector<bool> Graph::escaping(const std::vector<int>& extra) const {
  std::vector<bool> e(values.size(), false);
  for (int v : outputs) e[static_cast<size_t>(v)] = true;
  for (int v : extra) e[static_cast<size_t>(v)] = true;
  return e;
}

std::string Graph::str() const {
  std::string s;
  for (int v : inputs) {
    const Value& val = values[static_cast<size_t>(v)];
    s += fmt::format("  %{} = {}[{}] : {}{}\n", v, input_kind_name(val.input.kind), val.input.index, meta_str(val.meta),
                     val.requires_grad ? " (requires grad)" : "");
  }
  for (const Node& n : nodes) {
    std::string outs, ins, types;
    for (size_t i = 0; i < n.outputs.size(); ++i) {
      outs += fmt::format("{}%{}", i ? ", " : "", n.outputs[i]);
      types += fmt::format("{}{}", i ? ", " : "", meta_str(values[static_cast<size_t>(n.outputs[i])].meta));
    }
    for (size_t i = 0; i < n.inputs.size(); ++i) ins += fmt::format("{}%{}", i ? ", " : "", n.inputs[i]);
    const std::string attrs = n.op->attributes();
    s += fmt::format("  {} = {}{}({}{}{}) : {}\n", outs, n.op->name(), n.op->is_view() ? " [view]" : "", ins,
                     attrs.empty() ? "" : "; ", attrs, types);
  }
  std::string outs;
  for (size_t i = 0; i < outputs.size(); ++i) outs += fmt::format("{}%{}", i ? ", " : "", outputs[i]);
  s += fmt::format("  return {}\n", outs);
  return s;
}

}  // namespace kiln::compile

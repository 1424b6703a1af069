// Plan building (passes, fusion, a topological schedule of groups and single ops, lifetimes) and
// running a plan on real tensors.
#include "compile/plan.h"

#include <fmt/format.h>

#include <queue>

#include "autograd/grad_mode.h"
#include "compile/executor.h"
#include "compile/passes.h"
#include "core/dispatch.h"
#include "core/ops/creation.h"
#include "core/ops/matmul.h"

namespace kiln::compile {
namespace {

// Orders groups and ungrouped nodes so every step follows the steps it reads from (Kahn's algorithm,
// earliest graph node first, so the schedule stays close to the traced order).
std::vector<Step> schedule(const Graph& g, const Fusion& f, const std::vector<bool>& escapes) {
  const std::vector<std::vector<int>> users = g.users();
  const size_t ng = f.groups.size();
  std::vector<int> unit_of(g.nodes.size(), -1);  // units: groups first, then single nodes
  std::vector<Step> units;
  for (size_t gi = 0; gi < ng; ++gi) units.push_back({StepKind::group, static_cast<int>(gi), {}});
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    if (f.group_of[n] >= 0) {
      unit_of[n] = f.group_of[n];
      continue;
    }
    const NodeKind k = classify(g, static_cast<int>(n));
    if (k == NodeKind::fill) {
      bool standalone = false;  // read by something that does not inline it
      for (int v : g.nodes[n].outputs) {
        standalone = standalone || escapes[static_cast<size_t>(v)];
        for (int u : users[static_cast<size_t>(v)]) standalone = standalone || f.group_of[static_cast<size_t>(u)] < 0;
      }
      if (!standalone) continue;
    }
    const StepKind sk = k == NodeKind::view      ? StepKind::view
                        : k == NodeKind::fill    ? StepKind::fill
                        : k == NodeKind::unknown ? StepKind::fallback
                                                 : StepKind::library;
    unit_of[n] = static_cast<int>(units.size());
    units.push_back({sk, static_cast<int>(n), {}});
  }
  const size_t nu = units.size();
  std::vector<int> first(nu, static_cast<int>(g.nodes.size()));
  std::vector<std::vector<int>> next(nu);
  std::vector<int> pending(nu, 0);
  for (size_t n = 0; n < g.nodes.size(); ++n) {
    const int u = unit_of[n];
    if (u < 0) continue;
    first[static_cast<size_t>(u)] = std::min(first[static_cast<size_t>(u)], static_cast<int>(n));
    for (int v : g.nodes[n].inputs) {
      const int p = g.values[static_cast<size_t>(v)].producer;
      if (p < 0 || unit_of[static_cast<size_t>(p)] < 0 || unit_of[static_cast<size_t>(p)] == u) continue;
      next[static_cast<size_t>(unit_of[static_cast<size_t>(p)])].push_back(u);
      ++pending[static_cast<size_t>(u)];
    }
  }
  using Item = std::pair<int, int>;  // (first node, unit)
  std::priority_queue<Item, std::vector<Item>, std::greater<>> ready;
  for (size_t u = 0; u < nu; ++u)
    if (pending[u] == 0) ready.push({first[u], static_cast<int>(u)});
  std::vector<Step> steps;
  while (!ready.empty()) {
    const int u = ready.top().second;
    ready.pop();
    steps.push_back(units[static_cast<size_t>(u)]);
    for (int w : next[static_cast<size_t>(u)])
      if (--pending[static_cast<size_t>(w)] == 0) ready.push({first[static_cast<size_t>(w)], w});
  }
  KILN_CHECK(steps.size() == nu, "compile", "fusion made a cycle between steps ({} of {} scheduled)", steps.size(), nu);
  return steps;
}

// The values a step reads and writes.
void step_values(const Plan& p, const Step& s, std::vector<int>& reads, std::vector<int>& writes) {
  reads.clear();
  writes.clear();
  if (s.kind == StepKind::group) {
    const Program& prog = p.fusion.groups[static_cast<size_t>(s.index)].program;
    for (const Program::Input& in : prog.inputs) reads.push_back(in.value);
    for (const Program::Output& o : prog.outputs) writes.push_back(o.value);
    return;
  }
  const Node& n = p.graph.nodes[static_cast<size_t>(s.index)];
  reads = n.inputs;
  writes = n.outputs;
}

Shape rows_of(const Shape& s) { return Shape(s.begin(), s.end() - (s.empty() ? 0 : 1)); }

}  // namespace

Plan build_plan(const PlanInput& in) {
  Plan plan;
  Rewrite c = eliminate_common_subexpressions(*in.graph);
  std::vector<int> keep;
  for (int v : in.keep) keep.push_back(c.value_map[static_cast<size_t>(v)]);
  Rewrite d = eliminate_dead_code(c.graph, keep);
  std::vector<int> kept_d;
  for (int v : keep) kept_d.push_back(d.value_map[static_cast<size_t>(v)]);
  Rewrite f = fold_adds_into_matmuls(d.graph, d.graph.escaping(kept_d));
  for (int v : kept_d) plan.kept.push_back(f.value_map[static_cast<size_t>(v)]);
  plan.graph = std::move(f.graph);
  plan.cse_guards = std::move(c.merged);
  plan.shape_guards = std::move(f.same_shape);
  plan.folded_adds = f.folded;
  const std::vector<bool> escapes = plan.graph.escaping(plan.kept);
  plan.fusion = fuse(plan.graph, escapes, in.fuse);
  plan.steps = schedule(plan.graph, plan.fusion, escapes);
  for (const Group& grp : plan.fusion.groups) {
    const Value& dv = plan.graph.values[static_cast<size_t>(grp.domain_value)];
    int64_t fixed = -1;
    const int t = dv.origin.trace;
    if (!dv.meta.shape.empty() && dv.origin.index >= 0 && in.signatures[t] && in.profiles[t])
      fixed = in.profiles[t]->static_dim(*in.signatures[t], dv.origin.index, static_cast<int>(dv.meta.shape.size()) - 1);
    plan.static_row_length.push_back(fixed);
  }
  // lifetimes: drop each value after the last step that reads it (outputs and kept values stay)
  std::vector<int> last(plan.graph.values.size(), -1);
  std::vector<int> reads, writes;
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    step_values(plan, plan.steps[i], reads, writes);
    for (int v : writes) last[static_cast<size_t>(v)] = std::max(last[static_cast<size_t>(v)], static_cast<int>(i));
    for (int v : reads) last[static_cast<size_t>(v)] = static_cast<int>(i);
    switch (plan.steps[i].kind) {
      case StepKind::view: break;
      case StepKind::fallback: ++plan.fallbacks; [[fallthrough]];
      default: ++plan.kernels;
    }
  }
  for (size_t v = 0; v < last.size(); ++v)
    if (last[v] >= 0 && !escapes[v]) plan.steps[static_cast<size_t>(last[v])].release.push_back(static_cast<int>(v));
  return plan;
}

std::string Plan::str() const {
  std::string s = fmt::format("  {} steps, {} kernels ({} fused groups, {} fallbacks, {} adds in GEMM epilogues):\n",
                              steps.size(), kernels, fusion.groups.size(), fallbacks, folded_adds);
  for (const Step& st : steps) {
    if (st.kind == StepKind::group) {
      const Group& grp = fusion.groups[static_cast<size_t>(st.index)];
      std::string names;
      for (int n : grp.nodes) names += fmt::format(" {}", graph.nodes[static_cast<size_t>(n)].op->name());
      s += fmt::format("    group {}:{}\n", st.index, names);
    } else {
      static const char* const kinds[] = {"view", "library", "fallback", "fill", "group"};
      const Node& n = graph.nodes[static_cast<size_t>(st.index)];
      s += fmt::format("    {} {}{}\n", kinds[static_cast<int>(st.kind)], n.op->name(),
                       dynamic_cast<const prim::Matmul*>(n.op.get()) && n.inputs.size() == 3 ? " + addend" : "");
    }
  }
  return s;
}

namespace {

const Node& call_node(const Bindings& b, const Node& n) {
  return b.traces[n.origin.trace]->nodes[static_cast<size_t>(n.origin.index)];
}
const TensorMeta& call_meta(const Bindings& b, const Value& v) {
  return b.traces[v.origin.trace]->values[static_cast<size_t>(v.origin.index)].meta;
}

}  // namespace

bool plan_guards_hold(const Plan& plan, const Bindings& b, std::string* why) {
  for (const auto& [a, m] : plan.cse_guards) {
    const Primitive& pa = *b.traces[a.trace]->nodes[static_cast<size_t>(a.index)].op;
    const Primitive& pm = *b.traces[m.trace]->nodes[static_cast<size_t>(m.index)].op;
    if (!pa.equals(pm)) {
      if (why) *why = fmt::format("{} ops merged by CSE differ in this call", pa.name());
      return false;
    }
  }
  for (const auto& [a, c] : plan.shape_guards) {
    const Shape& sa = b.traces[a.trace]->values[static_cast<size_t>(a.index)].meta.shape;
    const Shape& sc = b.traces[c.trace]->values[static_cast<size_t>(c.index)].meta.shape;
    if (sa != sc) {
      if (why) *why = fmt::format("a GEMM's addend is {} where its product is {} in this call", shape_str(sc), shape_str(sa));
      return false;
    }
  }
  const Graph& g = plan.graph;
  for (const Group& grp : plan.fusion.groups) {
    const Shape& s = call_meta(b, g.values[static_cast<size_t>(grp.domain_value)]).shape;
    for (int n : grp.nodes) {
      const Node& node = g.nodes[static_cast<size_t>(n)];
      if (classify(g, n) == NodeKind::row && call_meta(b, g.values[static_cast<size_t>(node.inputs[0])]).shape != s) {
        if (why) *why = fmt::format("{} no longer reduces the group's domain", node.op->name());
        return false;
      }
      for (int v : node.outputs) {
        const Shape& vs = call_meta(b, g.values[static_cast<size_t>(v)]).shape;
        const Shape& compiled_shape = g.values[static_cast<size_t>(v)].meta.shape;
        const Shape& compiled_domain = g.values[static_cast<size_t>(grp.domain_value)].meta.shape;
        Shape want = s;
        if (plan.fusion.level[static_cast<size_t>(v)] == Level::row) {
          want = rows_of(s);
          if (compiled_shape.size() == compiled_domain.size()) want.push_back(1);
        } else if (compiled_shape != compiled_domain) {  // a broadcast producer, recomputed per element
          if (broadcasts_to(vs, s)) continue;
          want = compiled_shape;
        }
        if (vs != want) {
          if (why) *why = fmt::format("{} makes {} where its group expects {}", node.op->name(), shape_str(vs), shape_str(want));
          return false;
        }
      }
    }
  }
  return true;
}

RunResult run_plan(const Plan& plan, const Bindings& b) {
  autograd::NoGradGuard no_grad;
  const Graph& g = plan.graph;
  std::vector<Tensor> vals(g.values.size());
  for (int v : g.inputs) vals[static_cast<size_t>(v)] = b.input(g.values[static_cast<size_t>(v)]);
  std::vector<Tensor> ins;
  for (const Step& st : plan.steps) {
    if (st.kind == StepKind::group) {
      const Group& grp = plan.fusion.groups[static_cast<size_t>(st.index)];
      const Program& p = grp.program;
      GroupArgs a;
      a.domain = call_meta(b, g.values[static_cast<size_t>(p.domain_value)]).shape;
      a.static_row_length = plan.static_row_length[static_cast<size_t>(st.index)];
      for (const Program::Input& in : p.inputs) a.inputs.push_back(vals[static_cast<size_t>(in.value)]);
      for (const Program::Output& o : p.outputs) {
        const TensorMeta& m = call_meta(b, g.values[static_cast<size_t>(o.value)]);
        a.outputs.push_back(empty(m.shape, m.dtype, m.device));
        vals[static_cast<size_t>(o.value)] = a.outputs.back();
      }
      for (int n : p.rng_nodes) {
        const auto& d = static_cast<const prim::Dropout&>(*call_node(b, g.nodes[static_cast<size_t>(n)]).op);
        a.rng.emplace_back(d.seed(), d.offset());
      }
      const Device dev = call_meta(b, g.values[static_cast<size_t>(p.domain_value)]).device;
      if (dev.is_cuda()) {
        run_group_cuda(p, a);
      } else {
        run_group_cpu(p, a);
      }
    } else {
      const Node& n = g.nodes[static_cast<size_t>(st.index)];
      const PrimitivePtr& op = call_node(b, n).op;
      ins.clear();
      for (int v : n.inputs) ins.push_back(vals[static_cast<size_t>(v)]);
      if (st.kind == StepKind::view) {
        vals[static_cast<size_t>(n.outputs[0])] = op->make_view(ins);
      } else {
        std::vector<Tensor> outs = dispatch(op, ins);
        for (size_t i = 0; i < n.outputs.size(); ++i) vals[static_cast<size_t>(n.outputs[i])] = outs[i];
      }
    }
    for (int v : st.release) vals[static_cast<size_t>(v)] = Tensor();
  }
  RunResult r;
  for (int v : g.outputs) r.outputs.push_back(vals[static_cast<size_t>(v)]);
  for (int v : plan.kept) r.kept.push_back(vals[static_cast<size_t>(v)]);
  return r;
}

}  // namespace kiln::compile

// Greedy fusion in graph order: each fusable node joins the group of one of its producers when the
// shapes fit the group's domain and joining makes no cycle between steps (no path leaves the group
// and comes back through an op outside it); otherwise it starts a group. Groups of one node that
// reads no constant are dissolved: that op's own kernel runs instead.
#include "compile/fusion.h"

#include <algorithm>
#include <iterator>
#include <fmt/format.h>

#include "core/ops/activation.h"
#include "core/ops/attention.h"
#include "core/ops/copy.h"
#include "core/ops/creation.h"
#include "core/ops/elementwise.h"
#include "core/ops/indexing.h"
#include "core/ops/loss.h"
#include "core/ops/matmul.h"
#include "core/ops/norm.h"
#include "core/ops/reduce.h"
#include "core/ops/rope.h"
#include "quant/nf4.h"

namespace kiln::compile {
namespace {

template <class... P>
bool is_any(const Primitive& op) {
  return (... || (dynamic_cast<const P*>(&op) != nullptr));
}

const Shape& shape_of(const Graph& g, int v) { return g.values[static_cast<size_t>(v)].meta.shape; }

bool last_dim_only(const std::vector<int64_t>& dims, size_t rank) {
  return rank >= 1 && dims.size() == 1 && dims[0] == static_cast<int64_t>(rank) - 1;
}

Shape rows_of(const Shape& s) { return Shape(s.begin(), s.end() - (s.empty() ? 0 : 1)); }
Shape keep_rows_of(const Shape& s) {
  Shape r = rows_of(s);
  r.push_back(1);
  return r;
}

// A row-level value of shape rs read by an element-level op over domain S.
bool row_broadcasts(const Shape& rs, const Shape& s) { return rs == keep_rows_of(s) || (s.size() <= 1 && numel(rs) == 1); }

}  // namespace

const char* node_kind_name(NodeKind k) {
  static const char* const names[] = {"view", "fill", "pointwise", "row", "library", "unknown"};
  return names[static_cast<int>(k)];
}

NodeKind classify(const Graph& g, int n) {
  const Node& node = g.nodes[static_cast<size_t>(n)];
  const Primitive& op = *node.op;
  if (op.is_view()) return NodeKind::view;
  if (is_any<prim::Fill>(op)) return NodeKind::fill;
  if (is_any<prim::Unary, prim::Binary, prim::Where, prim::Dropout, prim::SwiGlu, prim::SwiGluBackward>(op))
    return NodeKind::pointwise;
  if (is_any<prim::Copy>(op)) {
    const bool same_device = g.values[static_cast<size_t>(node.inputs[0])].meta.device ==
                             g.values[static_cast<size_t>(node.outputs[0])].meta.device;
    return same_device ? NodeKind::pointwise : NodeKind::library;
  }
  const size_t rank = node.inputs.empty() ? 0 : shape_of(g, node.inputs[0]).size();
  if (const auto* r = dynamic_cast<const prim::Reduce*>(&op)) return last_dim_only(r->dims(), rank) ? NodeKind::row : NodeKind::library;
  if (const auto* l = dynamic_cast<const prim::LogSumExp*>(&op))
    return last_dim_only(l->dims(), rank) ? NodeKind::row : NodeKind::library;
  if (const auto* s = dynamic_cast<const prim::Softmax*>(&op))
    return rank >= 1 && s->dim() == static_cast<int64_t>(rank) - 1 ? NodeKind::row : NodeKind::library;
  if (is_any<prim::RmsNorm>(op)) return rank >= 1 ? NodeKind::row : NodeKind::library;
  if (is_any<prim::Matmul, prim::ScaledDotProductAttention, prim::SdpaBackward, prim::RotaryEmbedding,
             prim::RmsNormBackward, prim::CrossEntropy, prim::CrossEntropyBackward, prim::Embedding,
             prim::EmbeddingBackward, prim::Cat, prim::SliceBackward, prim::Random, prim::Arange, prim::ArgMax,
             prim::Reduce, prim::Softmax, prim::LogSumExp, prim::NF4Dequantize, prim::Blockwise8bitDequantize>(op))
    return NodeKind::library;
  return NodeKind::unknown;
}

namespace {

class Fuser {
 public:
  Fuser(const Graph& g, const FuseOptions& o) : g_(g), o_(o) {
    f_.group_of.assign(g.nodes.size(), -1);
    f_.level.assign(g.values.size(), Level::element);
    deps_.resize(g.nodes.size());
    kinds_.resize(g.nodes.size());
  }

  Fusion run(const std::vector<bool>& escapes) {
    for (size_t n = 0; n < g_.nodes.size(); ++n) {
      kinds_[n] = classify(g_, static_cast<int>(n));
      collect_deps(static_cast<int>(n));
      if (kinds_[n] != NodeKind::pointwise && kinds_[n] != NodeKind::row) continue;
      std::vector<int> candidates;
      for (int v : g_.nodes[n].inputs) {
        const int p = g_.values[static_cast<size_t>(v)].producer;
        if (p >= 0 && f_.group_of[static_cast<size_t>(p)] >= 0) candidates.push_back(f_.group_of[static_cast<size_t>(p)]);
      }
      std::sort(candidates.rbegin(), candidates.rend());
      candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
      bool joined = false;
      for (int gi : candidates)
        if ((joined = try_join(static_cast<int>(n), gi))) break;
      if (!joined) start_group(static_cast<int>(n));
    }
    absorb_broadcast_producers(escapes);
    merge_siblings();
    dissolve_singletons();
    lower(escapes);
    return std::move(f_);
  }

 private:
  void collect_deps(int n) {
    std::vector<int>& d = deps_[static_cast<size_t>(n)];
    for (int v : g_.nodes[static_cast<size_t>(n)].inputs) {
      const int p = g_.values[static_cast<size_t>(v)].producer;
      if (p < 0) continue;
      const std::vector<int>& pd = deps_[static_cast<size_t>(p)];
      d.insert(d.end(), pd.begin(), pd.end());
      if (f_.group_of[static_cast<size_t>(p)] >= 0) d.push_back(f_.group_of[static_cast<size_t>(p)]);
    }
    std::sort(d.begin(), d.end());
    d.erase(std::unique(d.begin(), d.end()), d.end());
  }

  bool in_group(int v, int gi) const {
    const int p = g_.values[static_cast<size_t>(v)].producer;
    return p >= 0 && f_.group_of[static_cast<size_t>(p)] == gi;
  }

  // The level node n's outputs would have in group gi, or false when it cannot join.
  bool fits(int n, int gi, Level& out) const {
    const Group& grp = f_.groups[static_cast<size_t>(gi)];
    const Node& node = g_.nodes[static_cast<size_t>(n)];
    const Shape& s = shape_of(g_, grp.domain_value);
    if (kinds_[static_cast<size_t>(n)] == NodeKind::row) {
      if (shape_of(g_, node.inputs[0]) != s) return false;
      for (int v : node.inputs)
        if (in_group(v, gi) && (f_.level[static_cast<size_t>(v)] != Level::element || shape_of(g_, v) != s)) return false;
      out = is_any<prim::Reduce, prim::LogSumExp>(*node.op) ? Level::row : Level::element;
      return true;
    }
    const Shape& so = shape_of(g_, node.outputs[0]);
    if (so == s) {
      for (int v : node.inputs)
        if (in_group(v, gi) && f_.level[static_cast<size_t>(v)] == Level::row && !row_broadcasts(shape_of(g_, v), s))
          return false;
      out = Level::element;
      return true;
    }
    const bool scalar_op = is_any<prim::Unary, prim::Binary, prim::Where, prim::Copy>(*node.op);
    if (!grp.row || !scalar_op || (so != rows_of(s) && so != keep_rows_of(s))) return false;
    for (int v : node.inputs)
      if (in_group(v, gi) && (f_.level[static_cast<size_t>(v)] != Level::row || shape_of(g_, v) != so)) return false;
    out = Level::row;
    return true;
  }

  int inputs_with(int gi, int n) const {
    std::vector<int> ins;
    auto add = [&](int node) {
      for (int v : g_.nodes[static_cast<size_t>(node)].inputs) {
        const int p = g_.values[static_cast<size_t>(v)].producer;
        if (in_group(v, gi) || (p >= 0 && kinds_[static_cast<size_t>(p)] == NodeKind::fill)) continue;
        ins.push_back(v);
      }
    };
    for (int m : f_.groups[static_cast<size_t>(gi)].nodes) add(m);
    add(n);
    std::sort(ins.begin(), ins.end());
    return static_cast<int>(std::unique(ins.begin(), ins.end()) - ins.begin());
  }

  bool try_join(int n, int gi) {
    for (int v : g_.nodes[static_cast<size_t>(n)].inputs) {
      const int p = g_.values[static_cast<size_t>(v)].producer;
      if (p < 0 || f_.group_of[static_cast<size_t>(p)] == gi) continue;
      const std::vector<int>& pd = deps_[static_cast<size_t>(p)];
      if (std::binary_search(pd.begin(), pd.end(), gi)) return false;  // a path leaves the group and returns
    }
    Group& grp = f_.groups[static_cast<size_t>(gi)];
    if (static_cast<int>(grp.nodes.size()) >= o_.max_nodes || inputs_with(gi, n) > o_.max_inputs) return false;
    Level lv;
    if (!fits(n, gi, lv)) return false;
    grp.nodes.push_back(n);
    if (kinds_[static_cast<size_t>(n)] == NodeKind::row) grp.row = true;
    f_.group_of[static_cast<size_t>(n)] = gi;
    for (int v : g_.nodes[static_cast<size_t>(n)].outputs) f_.level[static_cast<size_t>(v)] = lv;
    return true;
  }

  void start_group(int n) {
    Group grp;
    grp.nodes.push_back(n);
    const Node& node = g_.nodes[static_cast<size_t>(n)];
    Level lv = Level::element;
    if (kinds_[static_cast<size_t>(n)] == NodeKind::row) {
      grp.row = true;
      grp.domain_value = node.inputs[0];
      if (is_any<prim::Reduce, prim::LogSumExp>(*node.op)) lv = Level::row;
    } else {
      grp.domain_value = node.outputs[0];
    }
    for (int v : node.outputs) f_.level[static_cast<size_t>(v)] = lv;
    f_.group_of[static_cast<size_t>(n)] = static_cast<int>(f_.groups.size());
    f_.groups.push_back(std::move(grp));
  }

  void recompute_deps() {
    for (auto& d : deps_) d.clear();
    for (size_t n = 0; n < g_.nodes.size(); ++n) collect_deps(static_cast<int>(n));
  }

  // A pointwise group over a smaller shape (a weight scaled, a bias squared) read only by one group
  // whose domain its shape broadcasts to joins that group: its values are recomputed per element.
  void absorb_broadcast_producers(const std::vector<bool>& escapes) {
    const std::vector<std::vector<int>> users = g_.users();
    for (size_t g2 = 0; g2 < f_.groups.size(); ++g2) {
      Group& small = f_.groups[g2];
      if (small.row || small.nodes.empty()) continue;
      int target = -1;
      bool ok = true;
      for (int n : small.nodes) {
        ok = ok && !is_any<prim::Dropout>(*g_.nodes[static_cast<size_t>(n)].op);
        for (int v : g_.nodes[static_cast<size_t>(n)].outputs) {
          ok = ok && !escapes[static_cast<size_t>(v)];
          for (int u : users[static_cast<size_t>(v)]) {
            const int gu = f_.group_of[static_cast<size_t>(u)];
            if (gu == static_cast<int>(g2)) continue;
            ok = ok && gu >= 0 && (target < 0 || target == gu);
            target = gu;
          }
        }
      }
      if (!ok || target < 0) continue;
      Group& big = f_.groups[static_cast<size_t>(target)];
      const Shape& s2 = shape_of(g_, small.domain_value);
      const Shape& s = shape_of(g_, big.domain_value);
      if (!broadcasts_to(s2, s)) continue;
      if (static_cast<int>(big.nodes.size() + small.nodes.size()) > o_.max_nodes) continue;
      for (int n : small.nodes)
        for (int v : g_.nodes[static_cast<size_t>(n)].inputs) {
          const int p = g_.values[static_cast<size_t>(v)].producer;
          if (p < 0 || f_.group_of[static_cast<size_t>(p)] == static_cast<int>(g2)) continue;
          const std::vector<int>& pd = deps_[static_cast<size_t>(p)];
          ok = ok && f_.group_of[static_cast<size_t>(p)] != target && !std::binary_search(pd.begin(), pd.end(), target);
        }
      if (!ok) continue;
      for (int n : small.nodes) f_.group_of[static_cast<size_t>(n)] = target;
      big.nodes.insert(big.nodes.end(), small.nodes.begin(), small.nodes.end());
      std::sort(big.nodes.begin(), big.nodes.end());
      small.nodes.clear();
      recompute_deps();
    }
    drop_empty_groups();
  }

  // The distinct values a group reads from outside (fills excluded).
  std::vector<int> reads_of(const Group& grp, int gi) const {
    std::vector<int> r;
    for (int n : grp.nodes)
      for (int v : g_.nodes[static_cast<size_t>(n)].inputs) {
        const int p = g_.values[static_cast<size_t>(v)].producer;
        if (!in_group(v, gi) && !(p >= 0 && kinds_[static_cast<size_t>(p)] == NodeKind::fill)) r.push_back(v);
      }
    std::sort(r.begin(), r.end());
    r.erase(std::unique(r.begin(), r.end()), r.end());
    return r;
  }

  bool depends_on(const Group& grp, int gi) const {
    for (int n : grp.nodes) {
      const std::vector<int>& d = deps_[static_cast<size_t>(n)];
      if (std::binary_search(d.begin(), d.end(), gi)) return true;
    }
    return false;
  }

  // Groups over one domain that read a common tensor and do not depend on each other become one
  // group (one sweep reads the shared input once): the two halves of a rotation, two row
  // reductions of one tensor.
  void merge_siblings() {
    for (size_t a = 0; a < f_.groups.size(); ++a) {
      for (size_t b = a + 1; b < f_.groups.size(); ++b) {
        Group& ga = f_.groups[a];
        Group& gb = f_.groups[b];
        if (ga.nodes.empty() || gb.nodes.empty()) continue;
        if (shape_of(g_, ga.domain_value) != shape_of(g_, gb.domain_value)) continue;
        if (static_cast<int>(ga.nodes.size() + gb.nodes.size()) > o_.max_nodes) continue;
        const std::vector<int> ra = reads_of(ga, static_cast<int>(a)), rb = reads_of(gb, static_cast<int>(b));
        std::vector<int> shared, all;
        std::set_intersection(ra.begin(), ra.end(), rb.begin(), rb.end(), std::back_inserter(shared));
        std::set_union(ra.begin(), ra.end(), rb.begin(), rb.end(), std::back_inserter(all));
        if (shared.empty() || static_cast<int>(all.size()) > o_.max_inputs) continue;
        if (depends_on(ga, static_cast<int>(b)) || depends_on(gb, static_cast<int>(a))) continue;
        for (int n : gb.nodes) f_.group_of[static_cast<size_t>(n)] = static_cast<int>(a);
        ga.row = ga.row || gb.row;
        ga.nodes.insert(ga.nodes.end(), gb.nodes.begin(), gb.nodes.end());
        std::sort(ga.nodes.begin(), ga.nodes.end());
        gb.nodes.clear();
        recompute_deps();
      }
    }
    drop_empty_groups();
  }

  void drop_empty_groups() {
    std::vector<Group> kept;
    std::vector<int> renumber(f_.groups.size(), -1);
    for (size_t gi = 0; gi < f_.groups.size(); ++gi) {
      if (f_.groups[gi].nodes.empty()) continue;
      renumber[gi] = static_cast<int>(kept.size());
      kept.push_back(std::move(f_.groups[gi]));
    }
    for (int& gi : f_.group_of)
      if (gi >= 0) gi = renumber[static_cast<size_t>(gi)];
    f_.groups = std::move(kept);
    recompute_deps();
  }

  void dissolve_singletons() {
    std::vector<Group> kept;
    std::vector<int> renumber(f_.groups.size(), -1);
    for (size_t gi = 0; gi < f_.groups.size(); ++gi) {
      Group& grp = f_.groups[gi];
      bool reads_fill = false;
      for (int v : g_.nodes[static_cast<size_t>(grp.nodes[0])].inputs) {
        const int p = g_.values[static_cast<size_t>(v)].producer;
        reads_fill = reads_fill || (p >= 0 && kinds_[static_cast<size_t>(p)] == NodeKind::fill);
      }
      if (grp.nodes.size() == 1 && !reads_fill) {
        f_.group_of[static_cast<size_t>(grp.nodes[0])] = -1;
        continue;
      }
      renumber[gi] = static_cast<int>(kept.size());
      kept.push_back(std::move(grp));
    }
    for (int& gi : f_.group_of)
      if (gi >= 0) gi = renumber[static_cast<size_t>(gi)];
    f_.groups = std::move(kept);
  }

  void lower(const std::vector<bool>& escapes) {
    const std::vector<std::vector<int>> users = g_.users();
    for (size_t gi = 0; gi < f_.groups.size(); ++gi) {
      Group& grp = f_.groups[gi];
      std::vector<bool> out = escapes;
      for (int n : grp.nodes)
        for (int v : g_.nodes[static_cast<size_t>(n)].outputs)
          for (int u : users[static_cast<size_t>(v)])
            if (f_.group_of[static_cast<size_t>(u)] != static_cast<int>(gi)) out[static_cast<size_t>(v)] = true;
      grp.program = lower_group(g_, grp.nodes, f_.level, out, grp.domain_value, grp.row);
    }
  }

  const Graph& g_;
  const FuseOptions& o_;
  Fusion f_;
  std::vector<std::vector<int>> deps_;  // per node: the groups it depends on, sorted
  std::vector<NodeKind> kinds_;
};

}  // namespace

Fusion fuse(const Graph& g, const std::vector<bool>& escapes, const FuseOptions& options) {
  if (!options.enabled) {
    Fusion f;
    f.group_of.assign(g.nodes.size(), -1);
    f.level.assign(g.values.size(), Level::element);
    return f;
  }
  return Fuser(g, options).run(escapes);
}

std::string fusion_str(const Graph& g, const Fusion& f) {
  std::string s;
  for (size_t gi = 0; gi < f.groups.size(); ++gi) {
    const Group& grp = f.groups[gi];
    std::string names;
    for (int n : grp.nodes) names += fmt::format("{}{}", names.empty() ? "" : " ", g.nodes[static_cast<size_t>(n)].op->name());
    s += fmt::format("  group {} ({}, domain {}): {}\n", gi, grp.row ? "row" : "pointwise",
                     shape_str(shape_of(g, grp.domain_value)), names);
    s += grp.program.str();
  }
  return s;
}

}  // namespace kiln::compile

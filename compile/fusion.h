// Fusion: groups chains of elementwise ops (unary, binary, where, casts, dropout, swiglu), the
// broadcasts they do, and the last-dim row reductions that follow them (sum/mean/max/min, softmax,
// logsumexp, rms_norm) into one group per region between opaque ops. Opaque ops (matmul, attention,
// rope, embedding, NF4 dequantisation, column reductions, ...) stay library calls in the plan; ops
// the fuser does not know also stay eager ops there (counted as fallbacks) — never a change of result.
#pragma once
#include <vector>

#include "compile/program.h"

namespace kiln::compile {

enum class NodeKind : uint8_t {
  view,       // aliases its input
  fill,       // a constant: inlined into the groups that read it
  pointwise,  // elementwise over its output's shape
  row,        // reduces (or normalises) the last dim of its first input
  library,    // a known op with its own kernel (matmul, attention, rope, ...)
  unknown,    // an op the fuser does not know: runs eagerly (a fallback)
};
NodeKind classify(const Graph& g, int node);
const char* node_kind_name(NodeKind k);

struct Group {
  std::vector<int> nodes;  // graph nodes, in graph order
  bool row = false;
  int domain_value = -1;   // the value whose shape is the group's domain S
  Program program;
};

struct Fusion {
  std::vector<Group> groups;
  std::vector<int> group_of;  // per node: its group, or -1
  std::vector<Level> level;   // per value computed in a group
};

struct FuseOptions {
  bool enabled = true;     // false: no groups (every op runs through dispatch)
  int max_nodes = 64;      // per group
  int max_inputs = 24;     // distinct tensors a group reads
};

// `escapes` marks values read after the graph (outputs, values kept for backward).
Fusion fuse(const Graph& g, const std::vector<bool>& escapes, const FuseOptions& options = {});
std::string fusion_str(const Graph& g, const Fusion& f);

}  // namespace kiln::compile

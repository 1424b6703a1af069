// Graph rewrites: dead-code elimination and common-subexpression elimination (by typed primitive
// identity, Primitive::equals/hash, never by name). Each returns a new graph whose nodes keep their
// origins, and a map from old value ids to new ones.
#pragma once
#include <utility>
#include <vector>

#include "compile/graph.h"

namespace kiln::compile {

struct Rewrite {
  Graph graph;
  std::vector<int> value_map;  // old value id -> new value id (-1: removed)
  // CSE: (kept node, merged node) origins. A later call must find these primitives equal again
  // (a guard), since their attributes may hold sizes that differ between calls.
  std::vector<std::pair<Origin, Origin>> merged;
};

// Drops nodes none of whose outputs reach a graph output or a value of `roots`. Inputs stay.
Rewrite eliminate_dead_code(const Graph& g, const std::vector<int>& roots = {});
// Merges nodes with equal primitives applied to the same values (the later one's outputs become
// the earlier one's).
Rewrite eliminate_common_subexpressions(const Graph& g);

// Composes value maps: first `a` (old -> mid), then `b` (mid -> new).
std::vector<int> compose(const std::vector<int>& a, const std::vector<int>& b);

}  // namespace kiln::compile

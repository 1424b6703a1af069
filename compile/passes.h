// Graph rewrites: dead-code elimination, common-subexpression elimination (by typed primitive
// identity, Primitive::equals/hash, never by name) and folding adds into GEMM epilogues. Each returns a
// new graph whose nodes keep their origins, and a map from old value ids to new ones.
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
  // Folding: (value, value) origins whose shapes a later call must find equal (a guard), since the
  // fold relies on an add of two equal shapes, not a broadcast.
  std::vector<std::pair<Origin, Origin>> same_shape;
  int folded = 0;  // adds folded into matmuls
};

// Drops nodes none of whose outputs reach a graph output or a value of `roots`. Inputs stay.
Rewrite eliminate_dead_code(const Graph& g, const std::vector<int>& roots = {});
// Merges nodes with equal primitives applied to the same values (the later one's outputs become
// the earlier one's).
Rewrite eliminate_common_subexpressions(const Graph& g);

// Folds add(m, c) (or add(c, m)) into matmul(a, b, c) — c added in the GEMM's epilogue, one rounding —
// where m = matmul(a, b) is read by nothing but that add, c has m's shape and dtype and comes from a
// kernel of its own (an input, a library op; pointwise work keeps the add in its fused group): the
// product is never written and read back. The LoRA sum base + (x A) B and gradient accumulation of a tensor several
// matmuls read (q, k and v projections) are such adds. The fused node sits at the add's place, with the
// matmul's origin (primitive) and the add's output (value origin). `escapes`: values read outside.
Rewrite fold_adds_into_matmuls(const Graph& g, const std::vector<bool>& escapes);

// Composes value maps: first `a` (old -> mid), then `b` (mid -> new).
std::vector<int> compose(const std::vector<int>& a, const std::vector<int>& b);

}  // namespace kiln::compile

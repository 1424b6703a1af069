// Save or recompute: which forward values the forward plan keeps for the backward, and the
// backward graph that recomputes the rest. Values made by library ops (GEMM outputs, attention's
// output and log-sum-exp), row-level values (an rstd) and values of unknown ops are kept; pointwise
// work (and views) whose inputs are available anyway is recomputed inside the backward's groups.
#pragma once
#include <vector>

#include "compile/graph.h"

namespace kiln::compile {

// Forward trace value ids to keep, given the traced backward (its saved inputs name forward values).
std::vector<int> choose_kept(const Graph& forward, const Graph& backward);

// The backward graph with the forward nodes it needs to recompute prepended (their origins point
// into the forward trace). Saved inputs left are forward inputs, forward outputs or kept values.
Graph backward_with_recompute(const Graph& forward, const Graph& backward, const std::vector<int>& kept);

}  // namespace kiln::compile

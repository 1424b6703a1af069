// A compiled plan: a traced graph simplified (CSE, DCE), fused, and scheduled as steps: views,
// library ops and fallbacks (run through dispatch), constants, and fused groups (one generated
// kernel each). A plan runs with the primitives and sizes of a later trace of the same structure:
// each step reads the call's own primitive (and shapes) through the node's origin.
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "compile/fusion.h"
#include "compile/signature.h"

namespace kiln::compile {

enum class StepKind : uint8_t { view, library, fallback, fill, group };

struct Step {
  StepKind kind;
  int index;                 // node (view, library, fallback, fill) or group
  std::vector<int> release;  // values no later step reads: dropped after this step
};

struct Plan {
  Graph graph;
  Fusion fusion;
  std::vector<Step> steps;
  std::vector<std::pair<Origin, Origin>> cse_guards;
  std::vector<std::pair<Origin, Origin>> shape_guards;  // (value, value) that must keep equal shapes
  int folded_adds = 0;       // adds done in GEMM epilogues
  std::vector<int> kept;     // values returned besides the outputs (forward: saved for backward)
  std::vector<int64_t> static_row_length;  // per group: the domain's last dim when fixed, else -1
  int kernels = 0;           // per run: groups + library ops + fallbacks + constants
  int fallbacks = 0;         // per run: ops the fuser does not know
  std::string str() const;
};

// CSE, then DCE keeping the outputs and `keep` (values of `graph`), fusion, scheduling. The
// signatures and profiles of the traces the graph's origins refer to (forward, backward; either may
// be null) tell which sizes are fixed.
struct PlanInput {
  const Graph* graph = nullptr;
  std::vector<int> keep;  // values of *graph to return besides the outputs
  FuseOptions fuse;
  const Signature* signatures[2] = {nullptr, nullptr};
  const SizeProfile* profiles[2] = {nullptr, nullptr};
};
Plan build_plan(const PlanInput& in);

// The call-specific side of a run: the traces the origins refer to and the real tensor of each input.
struct Bindings {
  const Graph* traces[2] = {nullptr, nullptr};
  std::function<Tensor(const Value& input)> input;
};

// Whether a call's traces still satisfy what the plan assumed beyond sizes: merged primitives equal,
// every group's values shaped as its domain requires. `why` says what failed.
bool plan_guards_hold(const Plan& plan, const Bindings& b, std::string* why = nullptr);

struct RunResult {
  std::vector<Tensor> outputs;
  std::vector<Tensor> kept;
};
RunResult run_plan(const Plan& plan, const Bindings& b);

}  // namespace kiln::compile

// Tracing at the dispatch point: a DispatchHandler records every op a function dispatches as a graph
// node and hands out placeholders (tensors without data) instead of running kernels. Forward and
// backward are both traced: the backward by running autograd on the traced outputs under the tracer,
// so every vjp's ops become the backward graph, reading forward values marked as saved.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "compile/graph.h"

namespace kiln::compile {

using Fn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

// One traced call. Tensors the function captured (parameters, constants, views of them: anything
// with data it did not receive as an argument) are graph inputs of kind external, found by tensor
// identity and held here. Views of captured tensors are taken eagerly (they alias, run no kernel);
// views of traced values are view nodes. Copies (device moves, casts), random numbers and aranges
// of nothing traced run when traced (modules cache such tensors, e.g. a rotary table moved to the
// GPU): their results are captured tensors of this call, random ones drawn as eager draws them. Other
// ops without traced inputs (fills, NF4 dequantisation, a parameter scaled) are nodes; dropout, whose
// input is traced, keeps its Philox seed and offset as attributes read from each call's trace.
struct TraceState {
  Graph forward;                      // trace 0
  Graph backward;                     // trace 1, when traced
  bool has_backward = false;
  std::vector<Tensor> externals;      // by external index: the forward's first, then backward-only ones
  size_t forward_externals = 0;       // how many of `externals` the forward found
  std::vector<Tensor> arg_proxies;    // placeholders standing for the arguments
  std::vector<Tensor> outputs;        // what the function returned (placeholders, or captured tensors)
  std::vector<int> grad_outputs;      // outputs that require grad: cotangent j is for outputs[grad_outputs[j]]
  std::vector<int> grad_args;         // arguments that require grad (backward outputs come first for them)
  std::vector<int> grad_externals;    // forward externals that require grad (their gradients follow)
  bool needs_grad = false;            // some output requires grad (autograd recorded the traced ops)
  bool pure = true;                   // no in-place op (copy_, fill_) was dispatched
  std::string impure_op;              // the first in-place op seen
  struct Maps;
  std::shared_ptr<Maps> maps;         // tensor identity -> value id, per trace
};

// Traces fn on placeholders standing for `args` (same shapes, strides, dtypes, devices and
// requires_grad) under the caller's grad mode. Kernels never run; errors of fn propagate.
std::shared_ptr<TraceState> trace_forward(const Fn& fn, const std::vector<Tensor>& args);
// Traces the backward of a forward traced with needs_grad: cotangent placeholders for the outputs
// that require grad, gradients for the arguments and then the forward externals that require grad
// (zeros where none flows). The traced autograd graph is retained, so it can be traced again.
void trace_backward(TraceState& t);
// Both, for inspection and tests: compile::trace(fn, inputs)->forward.str().
std::shared_ptr<TraceState> trace(const Fn& fn, const std::vector<Tensor>& example_inputs, bool backward = true);

// True while a compile tracer runs on this thread (compiled functions called inside a trace run
// their function directly, so the outer trace sees its ops).
bool tracing();

}  // namespace kiln::compile

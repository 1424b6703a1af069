// Custom autograd Function: the user writes forward (run with grad mode off) and backward (one
// gradient per input; undefined where none), saving what backward needs. Used where memory must be
// controlled by hand: chunked linear-loss, activation checkpointing, the NF4 linear.
//
//   struct Square : autograd::Function {
//     std::vector<Tensor> forward(const std::vector<Tensor>& in) override {
//       save_for_backward({in[0]}); return {in[0] * in[0]}; }
//     std::vector<Tensor> backward(const std::vector<Tensor>& g) override {
//       return {g[0] * saved()[0] * 2.0}; }
//   };
//   Tensor y = autograd::apply(std::make_shared<Square>(), {x})[0];
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace kiln::autograd {

class Function {
 public:
  virtual ~Function() = default;
  virtual const char* name() const { return "custom_function"; }
  virtual std::vector<Tensor> forward(const std::vector<Tensor>& inputs) = 0;
  virtual std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) = 0;
  // backward, offered the gradient already gathered for some inputs (addends[i] defined: another op
  // gave input i one first). It may return addends[i] plus its own gradient for input i, summed in its
  // kernel (the NF4 linear: in the GEMM's epilogue), and then undefine addends[i]; the engine adds the
  // others as usual. Primitive::vjp_accumulating is the same contract for ops.
  virtual std::vector<Tensor> backward_accumulating(const std::vector<Tensor>& grad_outputs,
                                                    std::vector<Tensor>& /*addends*/) {
    return backward(grad_outputs);
  }

  void save_for_backward(std::vector<Tensor> tensors);
  const std::vector<Tensor>& saved() const;  // error once a backward without retain_graph freed them
  // Which inputs need a gradient; valid inside backward.
  const std::vector<bool>& needs_input_grad() const { return needs_input_grad_; }
  // Whether backward is ops on its arguments and saved tensors only, so a tracer (compile/) can run it
  // on tensors without data. False for a backward that runs a nested backward or reads .grad
  // (checkpointing): a compiled region holding such a Function runs eagerly.
  virtual bool traceable_backward() const { return true; }
  // What backward reads: input i's value, the outputs' values. A checkpoint's recompute leaves out a
  // Function whose outputs nothing reads (autograd/checkpoint.h) when backward_reads_outputs() is
  // false, which promises as well that forward does nothing but compute the outputs and that backward
  // reads no tensor computed beside it (only the gradients, what it saved of its inputs and state made
  // before the code around it ran). By default backward may read everything.
  virtual bool backward_reads_input(size_t /*i*/) const { return true; }
  virtual bool backward_reads_outputs() const { return true; }
  // A checkpoint's recompute asks this, just before forward, of a Function it runs (one that may not be
  // left out) whose outputs nothing else reads. Returning true promises that this next forward still
  // does all that backward needs but may return the outputs left uncomputed (tensors of their shapes),
  // and that a later forward computes them in full. (A compiled function runs the part of its plan
  // that makes what its backward keeps: a decoder layer's last GEMMs are not run.)
  virtual bool leave_outputs_uncomputed() { return false; }

 private:
  friend class FunctionPrimitive;
  std::vector<Tensor> saved_;
  std::vector<bool> needs_input_grad_;
  bool released_ = false;
};

// Runs fn->forward(inputs) and, if grad mode is on and an input requires grad, records a node whose
// backward calls fn->backward. `always_record` records it whenever grad mode is on, for functions
// that reach trainable tensors other than through their inputs (checkpoint's captured parameters).
std::vector<Tensor> apply(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& inputs,
                          bool always_record = false);

// Sees the custom Functions this thread applies, around their forward (a checkpoint's recompute
// tells the ops inside a Function apart from the ones it calls directly).
class FunctionObserver {
 public:
  virtual ~FunctionObserver() = default;
  virtual void before_forward(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& inputs) = 0;
  // `outputs` is empty when forward threw.
  virtual void after_forward(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& outputs) = 0;
};
// RAII: `observer` sees this thread's Functions for the scope, then the one before it again.
class FunctionObserverScope {
 public:
  explicit FunctionObserverScope(FunctionObserver* observer);
  ~FunctionObserverScope();
  FunctionObserverScope(const FunctionObserverScope&) = delete;
  FunctionObserverScope& operator=(const FunctionObserverScope&) = delete;

 private:
  FunctionObserver* previous_;
};

// The name of a custom Function recorded since node sequence `since` (next_node_sequence()) in the
// graph behind `outputs` whose backward is not traceable (Function::traceable_backward), or null when
// there is none. Nodes recorded before `since` (history the outputs reach from outside) are not visited.
const char* untraceable_function(const std::vector<Tensor>& outputs, uint64_t since);

}  // namespace kiln::autograd

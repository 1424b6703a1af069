// The record and replay behind autograd::checkpoint's recompute (autograd/checkpoint.h): the calls a
// checkpointed function makes in its first forward, with their data flow; which of them nothing reads;
// and the dispatch handler that leaves those out when the function runs again. Internal to checkpoint.cpp.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/offload.h"
#include "core/random.h"

namespace kiln::autograd::detail {

// RAII: the default generator at `state` for the scope (a recompute drawing what forward drew), then
// back where it was, exceptions included.
class ReplayGenerator {
 public:
  explicit ReplayGenerator(const GeneratorState& state) : now_(default_generator().state()) {
    default_generator().set_state(state);
  }
  ~ReplayGenerator() { default_generator().set_state(now_); }
  ReplayGenerator(const ReplayGenerator&) = delete;
  ReplayGenerator& operator=(const ReplayGenerator&) = delete;

 private:
  GeneratorState now_;
};

// RAII: `h` (a Recorder or a Replayer) sees this thread's ops and custom Functions for the scope.
class InterceptScope {
 public:
  template <class H>
  explicit InterceptScope(H& h) : ops_(&h), functions_(&h) {}

 private:
  HandlerScope ops_;
  FunctionObserverScope functions_;
};

// One call the checkpointed function made itself in its first forward: an op other than a view, or
// a custom Function (the ops inside a Function are its own; views alias, so a view's consumers count
// as the consumers of the storage it views).
struct Call {
  PrimitivePtr op;                  // an op, or
  std::string function;             // a Function's name
  std::vector<TensorMeta> inputs;
  std::vector<int> producers;       // per input: the call whose output's storage it reads, or -1
  std::vector<bool> backward_reads; // per input: whether the backward reads its value
  bool reads_outputs = true;        // whether the backward reads the outputs' values
  bool may_skip = false;            // an op, or a Function whose backward reads no output
  bool reused = false;              // CheckpointOptions::save picked it: the recompute takes `outputs`
  bool skip = false;                // the recompute leaves its outputs uncomputed (nothing reads them)
  bool outputs_read = true;         // a later call or its backward reads the outputs (false: a Function
                                    // that runs may still leave them uncomputed)
  std::vector<Tensor> outputs;                              // reused: on the device, or
  std::vector<std::unique_ptr<OffloadedTensor>> offloaded;  // in host memory
};

inline std::vector<TensorMeta> metas_of(const std::vector<Tensor>& ts) {
  std::vector<TensorMeta> m;
  for (const Tensor& t : ts) m.push_back({t.shape(), t.dtype(), t.device()});
  return m;
}

inline bool same_metas(const std::vector<TensorMeta>& metas, const std::vector<Tensor>& inputs) {
  if (metas.size() != inputs.size()) return false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorMeta& m = metas[i];
    if (m.shape != inputs[i].shape() || m.dtype != inputs[i].dtype() || m.device != inputs[i].device()) return false;
  }
  return true;
}

// Whether a recompute may leave calls out: not with KILN_CHECKPOINT_RECOMPUTE_ALL=1 (for comparisons).
bool skipping_allowed();

// Which calls the recompute can leave out: those whose outputs nothing reads, neither a call that
// computes nor a backward. A call whose outputs are reused computes nothing and reads its inputs only
// in backward.
void mark_skippable(std::vector<Call>& calls);

// The first forward: records the calls and their data flow, keeping the outputs of those `save` picks.
// An in-place write among the calls (data flow through storage the record cannot follow) leaves every
// call computed in the recompute.
class Recorder final : public DispatchHandler, public FunctionObserver {
 public:
  // `keep_marked`: keep_for_recompute's tensors are kept too (while this recorder is the thread's latest).
  Recorder(const std::function<bool(const Primitive&)>& save, std::vector<Call>& calls, bool keep_marked = false)
      : save_(save), calls_(calls), previous_(t_recorder), keeping_(keep_marked) {
    if (keep_marked) t_recorder = this;
  }
  ~Recorder() override { t_recorder = previous_; }
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  // The recorder keep_for_recompute marks for, or null.
  static Recorder* keeping() { return t_recorder; }
  // The call (an op or a Function) that made `t` (a view of its output included) keeps its outputs for
  // the recompute, as if `save` had picked it; one whose other outputs are gone is not kept.
  void keep(const Tensor& t) {
    if (depth_ > 0 || !t.defined() || !t.storage()) return;
    auto it = producer_.find(t.storage().get());
    if (it == producer_.end()) return;
    Call& c = calls_[static_cast<size_t>(it->second)];
    if (c.reused) return;
    std::vector<Tensor> outs;
    for (const auto& [memory, layout] : outputs_[static_cast<size_t>(it->second)]) {
      Storage held = memory.lock();
      if (!held) return;
      outs.push_back(layout.detach());
      outs.back().impl()->storage = std::move(held);
    }
    c.reused = true;
    c.outputs = std::move(outs);
  }

  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    std::vector<Tensor> outs = dispatch_next(op, inputs);
    if (depth_ > 0 || op->is_view()) return outs;
    Call& c = begin(inputs);
    c.op = op;
    c.may_skip = true;
    c.reads_outputs = op->vjp_needs_outputs();
    for (size_t i = 0; i < inputs.size(); ++i) c.backward_reads.push_back(op->vjp_needs_inputs() && op->vjp_needs_input(i));
    if (save_ && save_(*op)) {
      c.reused = true;
      c.outputs = outs;
    }
    end(inputs, outs);
    return outs;
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    if (depth_ == 0) in_place_ = true;
    dispatch_next_into(op, inputs, outputs);
  }
  void before_forward(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& inputs) override {
    if (depth_++ > 0) return;
    Call& c = begin(inputs);
    c.function = fn->name();
    c.reads_outputs = fn->backward_reads_outputs();
    c.may_skip = !c.reads_outputs;
    for (size_t i = 0; i < inputs.size(); ++i) c.backward_reads.push_back(fn->backward_reads_input(i));
    pending_inputs_ = inputs;
  }
  void after_forward(const std::shared_ptr<Function>&, const std::vector<Tensor>& outputs) override {
    if (--depth_ > 0) return;
    end(pending_inputs_, outputs);
    pending_inputs_.clear();
  }

  // The record, marked (mark_skippable) unless an in-place write or a recorded step breaks it.
  void finish() {
    if (in_place_ || depth_ != 0 || !skipping_allowed()) return;
    mark_skippable(calls_);
  }

 private:
  Call& begin(const std::vector<Tensor>& inputs) {
    Call& c = calls_.emplace_back();
    c.inputs = metas_of(inputs);
    for (const Tensor& t : inputs) {
      auto it = t.defined() ? producer_.find(t.storage().get()) : producer_.end();
      c.producers.push_back(it == producer_.end() ? -1 : it->second);
    }
    return c;
  }
  // Outputs sharing an input's storage are written in place: the data flow stops being followed.
  void end(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs) {
    const int index = static_cast<int>(calls_.size()) - 1;
    if (keeping_) {  // what keep() needs: each output's memory and layout
      outputs_.resize(calls_.size());
      for (const Tensor& o : outputs) {
        if (!o.defined()) {
          outputs_.back().emplace_back();  // no memory: the call is never kept
          continue;
        }
        Tensor layout = o.detach();  // the shape and strides only: the record must not keep the memory
        layout.impl()->storage = nullptr;
        outputs_.back().emplace_back(o.storage(), std::move(layout));
      }
    }
    for (const Tensor& o : outputs) {
      if (!o.defined() || !o.storage()) continue;
      for (const Tensor& t : inputs)
        if (t.defined() && t.storage() == o.storage()) in_place_ = true;
      producer_[o.storage().get()] = index;
    }
  }

  inline static thread_local Recorder* t_recorder = nullptr;
  const std::function<bool(const Primitive&)>& save_;
  std::vector<Call>& calls_;
  Recorder* previous_;
  const bool keeping_;  // keep_marked: outputs_ is recorded
  std::unordered_map<const StorageImpl*, int> producer_;
  // Per call, when keeping_: each output's memory (while something holds it) and layout.
  std::vector<std::vector<std::pair<std::weak_ptr<StorageImpl>, Tensor>>> outputs_;
  std::vector<Tensor> pending_inputs_;  // the top-level Function's, while it runs
  int depth_ = 0;                       // Functions running
  bool in_place_ = false;
};

// Set while a Replayer runs left-out calls (inside its handler, where no other handler can be pushed).
inline thread_local bool t_filling = false;

// The recompute: each call the first forward recorded, when it comes again, takes its reused outputs,
// is left out (uncomputed tensors of the right shape stand for its outputs, for the backward graph's
// sake; a left-out Function's own ops all get such tensors) or runs; a Function that runs with its
// outputs unread is asked to leave them uncomputed (Function::leave_outputs_uncomputed: a compiled
// layer). Should the recompute depart from the record (a different call, an in-place write), or a
// running op read an output left uncomputed, the calls that left it run then in full (their outputs
// filled in) and every later op runs.
class Replayer final : public DispatchHandler, public FunctionObserver {
 public:
  explicit Replayer(std::vector<Call>& calls) : calls_(calls) {}

  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (filling_ || op->is_view()) return dispatch_next(op, inputs);
    if (depth_ > 0) {
      if (skipping_function_) return uncomputed(op, inputs);
    } else if (Call* c = next(*op, inputs)) {
      // (A second backward, with retain_graph, finds the reused outputs taken: the op runs again.)
      if (c->reused && !c->outputs.empty()) return std::move(c->outputs);
      if (c->skip) {
        std::vector<Tensor> outs = uncomputed(op, inputs);
        left_out(LeftOut{op, nullptr, {}, inputs, {}, {}}, outs);
        return outs;
      }
    }
    fill_if_read(inputs);
    return dispatch_next(op, inputs);
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    if (!filling_) {
      if (skipping_function_) return;  // a write into what the left-out Function computes
      if (depth_ == 0) depart();
      fill_if_read(inputs);
      fill_if_read(outputs);
    }
    dispatch_next_into(op, inputs, outputs);
  }
  void before_forward(const std::shared_ptr<Function>& fn, const std::vector<Tensor>& inputs) override {
    if (filling_ || depth_++ > 0) return;
    Call* c = next(*fn, inputs);
    if (c != nullptr && c->reused && !c->outputs.empty()) {  // its ops left uncomputed, its outputs the kept ones
      skipping_function_ = true;
      reused_ = std::move(c->outputs);
      return;
    }
    if (c == nullptr || !c->skip) {
      fill_if_read(inputs);
      // A Function that runs, its outputs unread: it may leave them uncomputed (stand-ins, as a left-out call's).
      outputs_left_ = c != nullptr && !c->outputs_read && fn->leave_outputs_uncomputed();
      if (!outputs_left_) return;
    } else {
      skipping_function_ = true;
    }
    function_ = LeftOut{nullptr, fn, default_generator().state(), inputs, {}, {}};
  }
  void after_forward(const std::shared_ptr<Function>&, const std::vector<Tensor>& outputs) override {
    if (filling_ || --depth_ > 0) return;
    if (!reused_.empty()) {
      skipping_function_ = false;
      take_reused(outputs);
      return;
    }
    if (!(skipping_function_ || outputs_left_)) return;
    skipping_function_ = outputs_left_ = false;
    left_out(std::move(function_), outputs);
  }

 private:
  // A left-out op or Function: what it takes, and the tensors that stand for its outputs.
  struct LeftOut {
    PrimitivePtr op;                 // an op, or
    std::shared_ptr<Function> fn;    // a Function, run again with the generator at `rng`
    GeneratorState rng;
    std::vector<Tensor> inputs;
    std::vector<std::weak_ptr<StorageImpl>> outputs;  // their memory, while someone holds it
    std::vector<Tensor> layouts;                      // their shapes and strides, without the memory
  };

  // A reused Function's outputs (uncomputed stand-ins) take the kept tensors' memory, or their values
  // where the layouts differ.
  void take_reused(const std::vector<Tensor>& outputs) {
    std::vector<Tensor> kept = std::move(reused_);
    reused_.clear();
    for (size_t i = 0; i < outputs.size() && i < kept.size(); ++i) {
      const Tensor& o = outputs[i];
      if (!o.defined() || !kept[i].defined()) continue;
      if (o.shape() == kept[i].shape() && o.strides() == kept[i].strides() && o.dtype() == kept[i].dtype() &&
          o.device() == kept[i].device()) {
        o.impl()->storage = kept[i].storage();
        o.impl()->offset = kept[i].impl()->offset;
      } else {
        NoGradGuard no_grad;
        o.detach().copy_(kept[i]);
      }
    }
  }

  // The recorded call this op or Function call is, or null (having departed from the record).
  Call* next(const Primitive& op, const std::vector<Tensor>& inputs) {
    return next_if([&](const Call& c) { return c.op && c.op->equals(op); }, inputs);
  }
  Call* next(const Function& fn, const std::vector<Tensor>& inputs) {
    return next_if([&](const Call& c) { return !c.op && c.function == fn.name(); }, inputs);
  }
  template <class Same>
  Call* next_if(Same&& same, const std::vector<Tensor>& inputs) {
    if (departed_) return nullptr;
    if (next_ < calls_.size() && same(calls_[next_]) && same_metas(calls_[next_].inputs, inputs)) return &calls_[next_++];
    depart();
    return nullptr;
  }
  void depart() {
    departed_ = true;
    fill_in();
  }
  // Tensors of the op's output shapes, left uncomputed.
  static std::vector<Tensor> uncomputed(const PrimitivePtr& op, const std::vector<Tensor>& inputs) {
    std::vector<Tensor> outs;
    for (const TensorMeta& m : op->infer(inputs)) outs.push_back(empty(m.shape, m.dtype, m.device));
    return outs;
  }
  void left_out(LeftOut l, const std::vector<Tensor>& outs) {
    prune();
    for (const Tensor& o : outs) {
      if (!o.storage()) continue;
      stand_ins_[o.storage().get()] = o.storage();
      l.outputs.push_back(o.storage());
      l.layouts.push_back(o.detach());
      l.layouts.back().impl()->storage = nullptr;  // the layout only: the entry must not keep the memory
    }
    left_.push_back(std::move(l));
  }
  void fill_if_read(const std::vector<Tensor>& tensors) {
    for (const Tensor& t : tensors) {
      if (!t.defined() || !t.storage()) continue;
      auto it = stand_ins_.find(t.storage().get());
      if (it != stand_ins_.end() && !it->second.expired()) return fill_in();
    }
  }
  // Drops the left-out calls whose outputs nobody holds any more (nothing can read them), the last
  // first: dropping one releases its inputs, which may be an earlier one's outputs.
  void prune() {
    for (size_t i = left_.size(); i-- > 0;) {
      bool held = false;
      for (const auto& o : left_[i].outputs) held = held || !o.expired();
      if (!held) left_.erase(left_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  // Runs the left-out calls still held, in order, each output written into the tensor that stood for it.
  void fill_in() {
    prune();
    if (left_.empty()) return;
    filling_ = t_filling = true;
    struct Done {
      bool& flag;
      ~Done() { flag = t_filling = false; }
    } done{filling_};
    NoGradGuard no_grad;
    for (LeftOut& l : left_) {
      std::vector<Tensor> real;
      if (l.op) {
        real = dispatch_next(l.op, l.inputs);
      } else {
        ReplayGenerator replay(l.rng);
        real = l.fn->forward(l.inputs);
      }
      for (size_t i = 0; i < real.size() && i < l.outputs.size(); ++i) {
        Storage memory = l.outputs[i].lock();
        if (!memory) continue;
        Tensor target = l.layouts[i].detach();
        target.impl()->storage = std::move(memory);
        target.copy_(real[i]);
      }
    }
    left_.clear();
    stand_ins_.clear();
  }

  std::vector<Call>& calls_;
  size_t next_ = 0;
  int depth_ = 0;  // Functions running
  bool skipping_function_ = false, departed_ = false, filling_ = false;
  bool outputs_left_ = false;  // the Function running leaves its outputs uncomputed
  LeftOut function_;           // the left-out Function running (or the one leaving its outputs)
  std::vector<Tensor> reused_; // the kept outputs of the reused Function running
  std::vector<LeftOut> left_;
  std::unordered_map<const StorageImpl*, std::weak_ptr<StorageImpl>> stand_ins_;
};

}  // namespace kiln::autograd::detail

// checkpoint() as a custom Function: forward under no_grad, backward = recompute with grad on, then
// a nested backward through the recomputed graph; checkpoint_chunks() the same piece by piece.
#include "autograd/checkpoint.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <unordered_map>

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/offload.h"
#include "core/random.h"

namespace kiln::autograd {
namespace {

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
  std::vector<Tensor> outputs;                              // reused: on the device, or
  std::vector<std::unique_ptr<OffloadedTensor>> offloaded;  // in host memory
};

std::vector<TensorMeta> metas_of(const std::vector<Tensor>& ts) {
  std::vector<TensorMeta> m;
  for (const Tensor& t : ts) m.push_back({t.shape(), t.dtype(), t.device()});
  return m;
}

bool same_metas(const std::vector<TensorMeta>& metas, const std::vector<Tensor>& inputs) {
  if (metas.size() != inputs.size()) return false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorMeta& m = metas[i];
    if (m.shape != inputs[i].shape() || m.dtype != inputs[i].dtype() || m.device != inputs[i].device()) return false;
  }
  return true;
}

// Set KILN_CHECKPOINT_RECOMPUTE_ALL=1 to have every recompute run every op (for comparisons).
bool skipping_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("KILN_CHECKPOINT_RECOMPUTE_ALL");
    return v == nullptr || std::string(v) != "1";
  }();
  return allowed;
}

// Which calls the recompute can leave out: those whose outputs nothing reads, neither a call that
// computes nor a backward (the values' readers come after their makers, so one pass from the end).
// A call whose outputs are reused computes nothing and reads its inputs only in backward.
void mark_skippable(std::vector<Call>& calls) {
  std::vector<bool> read(calls.size(), false);
  for (size_t c = calls.size(); c-- > 0;) {
    Call& call = calls[c];
    const bool computes = !call.reused && (!call.may_skip || call.reads_outputs || read[c]);
    call.skip = !call.reused && !computes;
    for (size_t i = 0; i < call.producers.size(); ++i)
      if (call.producers[i] >= 0 && (computes || call.backward_reads[i])) read[static_cast<size_t>(call.producers[i])] = true;
  }
}

// The first forward: records the calls and their data flow, keeping the outputs of those `save` picks.
// An in-place write among the calls (data flow through storage the record cannot follow) leaves every
// call computed in the recompute.
class Recorder final : public DispatchHandler, public FunctionObserver {
 public:
  Recorder(const std::function<bool(const Primitive&)>& save, std::vector<Call>& calls) : save_(save), calls_(calls) {}

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
    for (const Tensor& o : outputs) {
      if (!o.defined() || !o.storage()) continue;
      for (const Tensor& t : inputs)
        if (t.defined() && t.storage() == o.storage()) in_place_ = true;
      producer_[o.storage().get()] = index;
    }
  }

  const std::function<bool(const Primitive&)>& save_;
  std::vector<Call>& calls_;
  std::unordered_map<const StorageImpl*, int> producer_;
  std::vector<Tensor> pending_inputs_;  // the top-level Function's, while it runs
  int depth_ = 0;                       // Functions running
  bool in_place_ = false;
};

// Set while a Replayer runs left-out calls (inside its handler, where no other handler can be pushed).
thread_local bool t_filling = false;

// The recompute: each call the first forward recorded, when it comes again, takes its reused outputs,
// is left out (uncomputed tensors of the right shape stand for its outputs, for the backward graph's
// sake; a left-out Function's own ops all get such tensors) or runs. Should the recompute depart from
// the record (a different call, an in-place write), or a running op read a left-out output, the
// left-out calls run then (their outputs filled in) and every later op runs.
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
    const Call* c = next(*fn, inputs);
    if (c == nullptr || !c->skip) {
      fill_if_read(inputs);
      return;
    }
    skipping_function_ = true;
    function_ = LeftOut{nullptr, fn, default_generator().state(), inputs, {}, {}};
  }
  void after_forward(const std::shared_ptr<Function>&, const std::vector<Tensor>& outputs) override {
    if (filling_ || --depth_ > 0 || !skipping_function_) return;
    skipping_function_ = false;
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
  LeftOut function_;  // the left-out Function running
  std::vector<LeftOut> left_;
  std::unordered_map<const StorageImpl*, std::weak_ptr<StorageImpl>> stand_ins_;
};

// A root for backward that holds `t`'s node and metadata but not its data (backward reads only those);
// a leaf (an input returned as is) stays itself, as its gradient accumulates into it.
Tensor without_data(const Tensor& t) {
  if (!t.grad_fn()) return t;
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = t.shape();
  impl->strides = t.strides();
  impl->dtype = t.dtype();
  impl->device = t.device();
  impl->requires_grad = true;
  impl->grad_fn = t.grad_fn();
  impl->output_nr = t.impl()->output_nr;
  return Tensor(impl);
}

// An offloaded checkpoint's inputs, linked to the one made before it in forward.
struct Offloaded {
  std::vector<std::unique_ptr<OffloadedTensor>> inputs;
  std::vector<Call>* calls = nullptr;  // the checkpoint's calls (reused outputs offloaded too)
  std::weak_ptr<Offloaded> previous;
  bool fetched = false;
  void prefetch() {
    for (auto& t : inputs) t->prefetch();
    if (calls)
      for (Call& c : *calls)
        for (auto& t : c.offloaded) t->prefetch();
  }
};
// The offloaded checkpoint this thread made last (what the next one links to).
thread_local std::weak_ptr<Offloaded> last_offloaded;

class Checkpoint final : public Function {
 public:
  Checkpoint(CheckpointFn fn, CheckpointOptions options) : fn_(std::move(fn)), options_(options) {}
  const char* name() const override { return "checkpoint"; }
  bool traceable_backward() const override { return false; }  // a nested backward through the recompute

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override {
    rng_ = default_generator().state();
    for (const Tensor& t : inputs) requires_.push_back(t.requires_grad());
    if (options_.offload) {
      // The copies down are queued first, so they overlap with fn's own kernels.
      offloaded_ = std::make_shared<Offloaded>();
      for (const Tensor& t : inputs) offloaded_->inputs.push_back(std::make_unique<OffloadedTensor>(t));
      offloaded_->calls = &calls_;
      offloaded_->previous = last_offloaded;
      last_offloaded = offloaded_;
    } else {
      save_for_backward(inputs);
    }
    std::vector<Tensor> outs;
    {
      Recorder recorder(options_.save, calls_);
      HandlerScope scope(&recorder);
      FunctionObserverScope observing(&recorder);
      outs = fn_(inputs);
      recorder.finish();
    }
    if (options_.offload) {
      for (Call& c : calls_) {
        for (const Tensor& t : c.outputs) c.offloaded.push_back(std::make_unique<OffloadedTensor>(t));
        c.outputs.clear();
      }
    }
    return outs;
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) override {
    std::vector<Tensor> inputs;
    if (offloaded_) {
      KILN_CHECK(!offloaded_->fetched, "checkpoint",
                 "an offloaded checkpoint's backward ran twice: the first released its inputs");
      for (auto& t : offloaded_->inputs) inputs.push_back(t->fetch());
      offloaded_->inputs.clear();
      for (Call& c : calls_) {
        for (auto& t : c.offloaded) c.outputs.push_back(t->fetch());
        c.offloaded.clear();
      }
      offloaded_->fetched = true;
      if (auto previous = offloaded_->previous.lock()) previous->prefetch();
    } else {
      inputs = saved();
    }
    std::vector<Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Tensor t = inputs[i].detach();
      if (requires_[i]) t.set_requires_grad(true);
      leaves.push_back(t);
    }
    std::vector<Tensor> outs;
    {
      ReplayGenerator replay(rng_);
      EnableGradGuard grad_on;
      Replayer replayer(calls_);
      HandlerScope scope(&replayer);
      FunctionObserverScope observing(&replayer);
      outs = fn_(leaves);
    }
    std::vector<Tensor> roots, seeds;
    for (size_t i = 0; i < outs.size() && i < grad_outputs.size(); ++i) {
      if (outs[i].requires_grad()) { roots.push_back(without_data(outs[i])); seeds.push_back(grad_outputs[i]); }
    }
    outs.clear();  // the recomputed outputs' data is not needed by their backward (a decoder layer's output: 1 GiB at T131072)
    if (!roots.empty()) autograd::backward(roots, seeds);
    std::vector<Tensor> grads;
    for (const Tensor& l : leaves) grads.push_back(l.requires_grad() ? l.grad() : Tensor());
    return grads;
  }

 private:
  CheckpointFn fn_;
  CheckpointOptions options_;
  std::shared_ptr<Offloaded> offloaded_;  // with options_.offload
  std::vector<Call> calls_;               // what the first forward did (autograd/checkpoint.h)
  GeneratorState rng_;
  std::vector<bool> requires_;
};

// fn on x piece by piece along `dim`, each piece's output written into one tensor (x's shape). With
// `first`, the calls fn makes on the first piece are recorded there.
Tensor run_pieces(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, int64_t dim, int64_t chunk,
                  std::vector<Call>* first = nullptr) {
  Tensor out;
  for (int64_t s = 0; s < x.size(dim); s += chunk) {
    const Tensor piece = narrow(x, dim, s, std::min(chunk, x.size(dim) - s));
    Tensor y;
    if (s == 0 && first && !t_filling) {
      const std::function<bool(const Primitive&)> none;
      Recorder recorder(none, *first);
      HandlerScope scope(&recorder);
      FunctionObserverScope observing(&recorder);
      y = fn(piece);
      recorder.finish();
    } else {
      y = fn(piece);
    }
    KILN_CHECK(y.shape() == piece.shape(), "checkpoint_chunks", "the function must keep a piece's shape: {} gave {}",
               shape_str(piece.shape()), shape_str(y.shape()));
    if (!out.defined()) out = empty(x.shape(), y.dtype(), x.device());
    narrow(out, dim, s, piece.size(dim)).copy_(y);
  }
  return out;
}

// checkpoint_chunks: forward and backward piece by piece along one dim.
class ChunkedCheckpoint final : public Function {
 public:
  ChunkedCheckpoint(std::function<Tensor(const Tensor&)> fn, int64_t dim, int64_t chunk)
      : fn_(std::move(fn)), dim_(dim), chunk_(chunk) {}
  const char* name() const override { return "checkpoint_chunks"; }
  bool traceable_backward() const override { return false; }  // a nested backward per piece
  bool backward_reads_outputs() const override { return false; }  // x only: a decoder layer's recompute leaves its MLP pieces out

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override {
    rng_ = default_generator().state();
    save_for_backward({inputs[0]});
    first_piece_.clear();
    return {run_pieces(fn_, inputs[0], dim_, chunk_, &first_piece_)};
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) override {
    const Tensor x = saved()[0];
    const bool wants_x = needs_input_grad()[0];
    Tensor dx = wants_x ? empty(x.shape(), x.dtype(), x.device()) : Tensor();  // (x's shape)
    ReplayGenerator replay(rng_);  // the pieces draw as they did in forward, in the same order
    for (int64_t s = 0; s < x.size(dim_); s += chunk_) {
      const int64_t n = std::min(chunk_, x.size(dim_) - s);
      Tensor leaf = narrow(x, dim_, s, n).detach();
      if (wants_x) leaf.set_requires_grad(true);
      {
        EnableGradGuard grad_on;
        Tensor y;
        {
          Replayer replayer(first_piece_);  // pieces of the first one's size leave out what it could
          HandlerScope scope(&replayer);
          FunctionObserverScope observing(&replayer);
          y = fn_(leaf);
        }
        if (y.requires_grad()) autograd::backward({without_data(y)}, {narrow(grad_outputs[0], dim_, s, n)});
      }
      if (!wants_x) continue;
      Tensor piece = narrow(dx, dim_, s, n);
      if (leaf.grad().defined()) piece.copy_(leaf.grad());
      else piece.zero_();
    }
    return {dx};
  }

 private:
  std::function<Tensor(const Tensor&)> fn_;
  int64_t dim_, chunk_;
  GeneratorState rng_;
  std::vector<Call> first_piece_;  // what fn did on the first piece in forward
};

}  // namespace

Tensor checkpoint_chunks(std::function<Tensor(const Tensor&)> fn, const Tensor& x, int64_t dim, int64_t chunk) {
  KILN_CHECK(x.defined() && x.dim() > 0, "checkpoint_chunks", "expected a tensor with at least one dim");
  const int64_t d = wrap_dim(dim, x.dim(), "checkpoint_chunks");
  KILN_CHECK(chunk > 0, "checkpoint_chunks", "the chunk must be positive, found {}", chunk);
  // (Without grad too: a checkpoint's first forward, which runs without grad, then records the same
  // call its recompute makes.)
  return autograd::apply(std::make_shared<ChunkedCheckpoint>(std::move(fn), d, chunk), {x}, /*always_record=*/true)[0];
}

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options) {
  return autograd::apply(std::make_shared<Checkpoint>(std::move(fn), options), inputs, /*always_record=*/true);
}

}  // namespace kiln::autograd

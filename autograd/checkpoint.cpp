// checkpoint() as a custom Function: forward under no_grad, backward = recompute with grad on, then
// a nested backward through the recomputed graph; checkpoint_chunks() the same piece by piece.
#include "autograd/checkpoint.h"

#include <algorithm>

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/offload.h"
#include "core/random.h"

namespace kiln::autograd {
namespace {

// One op's outputs kept by the first forward for the recompute, with what identifies the op.
struct SavedOp {
  PrimitivePtr op;
  std::vector<TensorMeta> inputs;
  std::vector<Tensor> outputs;                                   // on the device, or
  std::vector<std::unique_ptr<OffloadedTensor>> offloaded;       // in host memory
};

std::vector<TensorMeta> metas_of(const std::vector<Tensor>& ts) {
  std::vector<TensorMeta> m;
  for (const Tensor& t : ts) m.push_back({t.shape(), t.dtype(), t.device()});
  return m;
}

bool same_op(const SavedOp& s, const Primitive& op, const std::vector<Tensor>& inputs) {
  if (!s.op->equals(op) || s.inputs.size() != inputs.size()) return false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorMeta& m = s.inputs[i];
    if (m.shape != inputs[i].shape() || m.dtype != inputs[i].dtype() || m.device != inputs[i].device()) return false;
  }
  return true;
}

// The first forward: keeps the outputs of the ops `save` picks.
class SaveOutputs final : public DispatchHandler {
 public:
  SaveOutputs(const std::function<bool(const Primitive&)>& save, std::vector<SavedOp>& out) : save_(save), out_(out) {}
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    std::vector<Tensor> outs = dispatch_next(op, inputs);
    if (!op->is_view() && save_(*op)) out_.push_back({op, metas_of(inputs), outs, {}});
    return outs;
  }

 private:
  const std::function<bool(const Primitive&)>& save_;
  std::vector<SavedOp>& out_;
};

// The recompute: the next saved op, when it is this one, gives its outputs instead of a kernel.
// Once the recompute departs from the first forward, every later op runs.
class ReuseOutputs final : public DispatchHandler {
 public:
  explicit ReuseOutputs(std::vector<SavedOp>& saved) : saved_(saved) {}
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    // (A second backward, with retain_graph, finds the outputs taken: the ops run again.)
    if (next_ < saved_.size() && !op->is_view() && !saved_[next_].outputs.empty() && same_op(saved_[next_], *op, inputs)) {
      std::vector<Tensor> outs = std::move(saved_[next_].outputs);
      ++next_;
      return outs;
    }
    return dispatch_next(op, inputs);
  }

 private:
  std::vector<SavedOp>& saved_;
  size_t next_ = 0;
};

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
  std::vector<SavedOp>* saved = nullptr;  // the checkpoint's saved ops (their outputs offloaded too)
  std::weak_ptr<Offloaded> previous;
  bool fetched = false;
  void prefetch() {
    for (auto& t : inputs) t->prefetch();
    if (saved)
      for (SavedOp& s : *saved)
        for (auto& t : s.offloaded) t->prefetch();
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
      offloaded_->saved = &saved_ops_;
      offloaded_->previous = last_offloaded;
      last_offloaded = offloaded_;
    } else {
      save_for_backward(inputs);
    }
    if (!options_.save) return fn_(inputs);
    std::vector<Tensor> outs;
    {
      SaveOutputs handler(options_.save, saved_ops_);
      HandlerScope scope(&handler);
      outs = fn_(inputs);
    }
    if (options_.offload) {
      for (SavedOp& s : saved_ops_) {
        for (const Tensor& t : s.outputs) s.offloaded.push_back(std::make_unique<OffloadedTensor>(t));
        s.outputs.clear();
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
      for (SavedOp& s : saved_ops_) {
        for (auto& t : s.offloaded) s.outputs.push_back(t->fetch());
        s.offloaded.clear();
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
      ReuseOutputs reuse(saved_ops_);
      HandlerScope scope(&reuse);
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
  std::vector<SavedOp> saved_ops_;        // with options_.save
  GeneratorState rng_;
  std::vector<bool> requires_;
};

// fn on x piece by piece along `dim`, each piece's output written into one tensor (x's shape).
Tensor run_pieces(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, int64_t dim, int64_t chunk) {
  Tensor out;
  for (int64_t s = 0; s < x.size(dim); s += chunk) {
    const Tensor piece = narrow(x, dim, s, std::min(chunk, x.size(dim) - s));
    const Tensor y = fn(piece);
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

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override {
    rng_ = default_generator().state();
    save_for_backward({inputs[0]});
    return {run_pieces(fn_, inputs[0], dim_, chunk_)};
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
        const Tensor y = fn_(leaf);
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
};

}  // namespace

Tensor checkpoint_chunks(std::function<Tensor(const Tensor&)> fn, const Tensor& x, int64_t dim, int64_t chunk) {
  KILN_CHECK(x.defined() && x.dim() > 0, "checkpoint_chunks", "expected a tensor with at least one dim");
  const int64_t d = wrap_dim(dim, x.dim(), "checkpoint_chunks");
  KILN_CHECK(chunk > 0, "checkpoint_chunks", "the chunk must be positive, found {}", chunk);
  if (!grad_enabled()) return run_pieces(fn, x, d, chunk);  // no backward to prepare for
  return autograd::apply(std::make_shared<ChunkedCheckpoint>(std::move(fn), d, chunk), {x}, /*always_record=*/true)[0];
}

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options) {
  return autograd::apply(std::make_shared<Checkpoint>(std::move(fn), options), inputs, /*always_record=*/true);
}

}  // namespace kiln::autograd

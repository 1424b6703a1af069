// checkpoint() as a custom Function: forward under no_grad, backward = recompute with grad on, then
// a nested backward through the recomputed graph; checkpoint_chunks() the same piece by piece.
#include "autograd/checkpoint.h"

#include <algorithm>
#include <map>

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "autograd/recompute.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/offload.h"
#include "core/random.h"

namespace kiln::autograd {
namespace {

using detail::Call;
using detail::InterceptScope;
using detail::Recorder;
using detail::Replayer;
using detail::ReplayGenerator;
using detail::t_filling;


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
      Recorder recorder(options_.save, calls_, options_.keep_marked);
      InterceptScope intercept(recorder);
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
      InterceptScope intercept(replayer);
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

// The calls fn made on the first piece of each size (a shorter last piece has its own).
using PieceRecords = std::map<int64_t, std::vector<Call>>;

// fn on x piece by piece along `dim`, each piece's output written into one tensor (x's shape). With
// `records`, the calls fn makes on the first piece of each size are recorded there.
Tensor run_pieces(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, int64_t dim, int64_t chunk,
                  PieceRecords* records = nullptr) {
  Tensor out;
  for (int64_t s = 0; s < x.size(dim); s += chunk) {
    const Tensor piece = narrow(x, dim, s, std::min(chunk, x.size(dim) - s));
    Tensor y;
    if (records && !records->count(piece.size(dim)) && !t_filling) {
      const std::function<bool(const Primitive&)> none;
      Recorder recorder(none, (*records)[piece.size(dim)]);
      InterceptScope intercept(recorder);
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
    records_.clear();
    return {run_pieces(fn_, inputs[0], dim_, chunk_, &records_)};
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
          Replayer replayer(records_[n]);  // each piece leaves out what the first of its size could
          InterceptScope intercept(replayer);
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
  PieceRecords records_;  // what fn did in forward on the first piece of each size
};

}  // namespace

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

Tensor checkpoint_chunks(std::function<Tensor(const Tensor&)> fn, const Tensor& x, int64_t dim, int64_t chunk) {
  KILN_CHECK(x.defined() && x.dim() > 0, "checkpoint_chunks", "expected a tensor with at least one dim");
  const int64_t d = wrap_dim(dim, x.dim(), "checkpoint_chunks");
  KILN_CHECK(chunk > 0, "checkpoint_chunks", "the chunk must be positive, found {}", chunk);
  // (Without grad too: a checkpoint's first forward, which runs without grad, then records the same
  // call its recompute makes.)
  return autograd::apply(std::make_shared<ChunkedCheckpoint>(std::move(fn), d, chunk), {x}, /*always_record=*/true)[0];
}

void keep_for_recompute(const Tensor& t) {
  if (Recorder* r = Recorder::keeping()) r->keep(t);
}

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options) {
  return autograd::apply(std::make_shared<Checkpoint>(std::move(fn), options), inputs, /*always_record=*/true);
}

}  // namespace kiln::autograd

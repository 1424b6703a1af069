// fully_shard's units and their schedule: sharding at construction, the forward hooks (gather, prefetch,
// reshard), the identity Functions that mark a unit's backward (gather before, reshard after), the
// post-accumulate-grad hooks that reduce gradients, and the end-of-backward callback that waits for them.
#include "dist/fully_shard.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <set>

#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "autograd/hooks.h"
#include "core/ops.h"
#include "core/ops/optim.h"
#include "dist/store.h"

namespace kiln::dist {

// The units of one root, in module order (the root first), and the phase they are in.
class FsdpSchedule : public std::enable_shared_from_this<FsdpSchedule> {
 public:
  std::vector<std::weak_ptr<FsdpUnit>> units;
  bool in_backward = false;

  std::shared_ptr<FsdpUnit> unit(size_t i) const { return i < units.size() ? units[i].lock() : nullptr; }

  // Whether a backward is running on this thread (a checkpointed block recomputing its forward). autograd
  // has no query for it; queue_callback is refused outside a backward, so a queued no-op answers it.
  bool backward_running() {
    try {
      autograd::queue_callback([] {});
    } catch (const Error&) {
      if (in_backward) abandon();  // a backward that threw never ran our callback
      return false;
    }
    begin_backward();
    return true;
  }

  // Called inside a backward: the first event of it queues the end-of-backward work.
  void begin_backward() {
    if (in_backward) return;
    autograd::queue_callback([self = shared_from_this()] { self->finish_backward(); });
    in_backward = true;
  }

  // Issues the gathers of the `count` units after `from` in this pass's order. Forward runs in module
  // order (the root first); backward starts at the root (its outputs are the model's), then goes from the
  // last unit back to the first; the root, gathered until backward ends, is never prefetched.
  void prefetch(size_t from, bool forward, int count) {
    const size_t n = units.size();
    for (size_t k = 1; k <= static_cast<size_t>(count); ++k) {
      size_t j = 0;
      if (forward) j = from + k;
      else if (from == 0) j = k < n ? n - k : 0;
      else j = k < from ? from - k : 0;
      if (j == 0 || j >= n) return;
      if (auto u = unit(j)) u->issue_gather();
    }
  }

  // End of the outermost backward: reductions not issued yet (a parameter without a gradient), in backward
  // order; every unit resharded; the gradients in place.
  void finish_backward() {
    in_backward = false;
    std::vector<std::shared_ptr<FsdpUnit>> live;
    for (size_t i = 0; i < units.size(); ++i)
      if (auto u = unit(i)) live.push_back(u);
    for (auto it = live.rbegin(); it != live.rend(); ++it) (*it)->issue_reduction();
    for (auto& u : live) u->reshard();
    for (auto& u : live) u->finish_reduction();
  }

  // A backward that failed: drop its reductions, reshard.
  void abandon() {
    in_backward = false;
    for (size_t i = 0; i < units.size(); ++i) {
      if (auto u = unit(i)) {
        u->reduction_.reset();
        u->reshard();
      }
    }
  }
};

namespace {

std::mutex g_registry_mutex;
std::map<const nn::Module*, std::weak_ptr<FsdpUnit>>& registry() {
  static std::map<const nn::Module*, std::weak_ptr<FsdpUnit>> r;
  return r;
}

// Identity on the tensors it is given; its backward runs `on_backward` first. Put on a unit's outputs it
// runs before the unit's backward (gather); on its inputs, after it (reshard).
class Marker final : public autograd::Function {
 public:
  Marker(const char* name, std::function<void()> on_backward) : name_(name), on_backward_(std::move(on_backward)) {}
  const char* name() const override { return name_; }
  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override { return inputs; }
  std::vector<Tensor> backward(const std::vector<Tensor>& grads) override {
    on_backward_();
    return grads;
  }

 private:
  const char* name_;
  std::function<void()> on_backward_;
};

// Passes the floating tensors of `ts` that require grad through a Marker (when grad mode is on).
void mark(std::vector<Tensor>& ts, const char* name, std::function<void()> on_backward) {
  if (!autograd::grad_enabled()) return;
  std::vector<size_t> at;
  std::vector<Tensor> in;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].defined() && is_floating(ts[i].dtype()) && ts[i].requires_grad()) {
      at.push_back(i);
      in.push_back(ts[i]);
    }
  }
  if (in.empty()) return;
  std::vector<Tensor> out = autograd::apply(std::make_shared<Marker>(name, std::move(on_backward)), in);
  for (size_t k = 0; k < at.size(); ++k) ts[at[k]] = out[k];
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

FsdpUnit::FsdpUnit(nn::Module& module, std::shared_ptr<ProcessGroup> group, const FullyShardOptions& options)
    : module_(&module), group_(std::move(group)), options_(options) {}

FsdpUnit::~FsdpUnit() {
  for (HookHandle& h : handles_) h.remove();
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto it = registry().find(module_);
  if (it != registry().end() && it->second.expired()) registry().erase(it);
}

bool FsdpUnit::is_root() const { return schedule_ && schedule_->unit(0).get() == this; }

std::vector<std::shared_ptr<FsdpUnit>> FsdpUnit::schedule_units() const {
  std::vector<std::shared_ptr<FsdpUnit>> out;
  for (size_t i = 0; i < schedule_->units.size(); ++i)
    if (auto u = schedule_->unit(i)) out.push_back(u);
  return out;
}

void FsdpUnit::set_overlap(int prefetch, bool async_reduce) {
  KILN_CHECK(prefetch >= 0, "fully_shard", "expected prefetch >= 0, found {}", prefetch);
  for (const auto& u : schedule_units()) {
    u->options_.prefetch = prefetch;
    u->options_.async_reduce = async_reduce;
  }
}

size_t FsdpUnit::local_bytes() const {
  size_t n = flat_.defined() ? flat_.nbytes() : 0;
  for (const FsdpTensor& t : tensors_)
    if (t.replicated) n += static_cast<size_t>(kiln::numel(t.shape)) * itemsize(t.dtype);
  return n;
}

size_t FsdpUnit::full_bytes() const {
  size_t n = 0;
  for (const FsdpTensor& t : tensors_) n += static_cast<size_t>(kiln::numel(t.shape)) * itemsize(t.dtype);
  return n;
}

void FsdpUnit::shard_tensors() {
  const int world = group_->size(), rank = group_->rank();
  Device device;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Tensor& t = tensors_[i].tensor;
    if (i == 0) device = t.device();
    KILN_CHECK(t.device() == device, "fully_shard", "{}: expected every tensor on one device, found {} on {} and {} on {}",
               module_->type_name(), tensors_[0].name, device.str(), tensors_[i].name, t.device().str());
    KILN_CHECK(t.storage() != nullptr, "fully_shard", "{}: tensor '{}' has no data", module_->type_name(), tensors_[i].name);
  }
  sizes_ = plan_layout(tensors_, world, options_.replicate_below);
  trainable_count_ = static_cast<size_t>(std::count_if(tensors_.begin(), tensors_.end(), [](const FsdpTensor& t) { return t.trainable; }));
  // Every rank must lay out the same tensors: a model built differently is an error here, not a hang later.
  if (auto store = group_->store()) {
    std::string desc;
    for (const FsdpTensor& t : tensors_)
      desc += fmt::format("{}:{}:{}:{};", t.name, shape_str(t.shape), dtype_name(t.dtype), t.trainable);
    check_same(*store, rank, world, "fully_shard layout",
               fmt::format("{} with {} tensors ({} trainable), {} bytes, layout {:016x}", module_->type_name(),
                           tensors_.size(), trainable_count_, full_bytes(), fnv1a(desc)),
               group_->timeout());
  }
  autograd::NoGradGuard no_grad;
  flat_ = zeros({static_cast<int64_t>(sizes_.shard_bytes)}, DType::u8, device);  // (shard_bytes) u8
  for (FsdpTensor& t : tensors_) {
    if (t.replicated) {
      t.shard = t.tensor;
      continue;
    }
    t.shard = typed_view(flat_, t.shard_offset, t.shard_shape(), t.dtype);
    copy_rows_to_shard(t, t.tensor.detach(), rank);
    nn::point_at(t.tensor, t.shard);  // the full data is freed unless held elsewhere
  }
}

void FsdpUnit::attach_hooks() {
  std::shared_ptr<FsdpUnit> self = shared_from_this();  // the module's hooks own the unit
  handles_.push_back(module_->register_forward_pre_hook(
      [self](nn::Module&, nn::Module::ForwardCall& call) { self->pre_forward(call); }));
  handles_.push_back(module_->register_forward_post_hook(
      [self](nn::Module&, const nn::Module::ForwardCall&, std::vector<Tensor>& outputs) { self->post_forward(outputs); }));
  std::weak_ptr<FsdpUnit> weak = self;  // the tensors' hooks do not (the unit holds the tensors)
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (!tensors_[i].trainable) continue;
    handles_.push_back(autograd::register_post_accumulate_grad_hook(tensors_[i].tensor, [weak, i](const Tensor& leaf) {
      if (auto u = weak.lock()) u->on_gradient(i, leaf);
    }));
  }
}

// ---- gather / reshard

void FsdpUnit::issue_gather() {
  if (state_ != State::sharded) return;
  state_ = State::gathering;
  if (sizes_.shard_bytes == 0) return;
  autograd::NoGradGuard no_grad;
  const int world = group_->size();
  if (world == 1) {
    gathered_ = flat_;
    return;
  }
  gathered_ = empty({static_cast<int64_t>(sizes_.shard_bytes) * world}, DType::u8, flat_.device());  // (world * shard_bytes)
  gather_work_ = group_->all_gather(gathered_, flat_);
}

void FsdpUnit::unshard() {
  if (state_ == State::gathered) return;
  issue_gather();
  autograd::NoGradGuard no_grad;
  gather_work_.wait();
  gather_work_ = Work();
  for (FsdpTensor& t : tensors_) {
    if (t.replicated) continue;
    t.full = unpack_gathered(t, gathered_, sizes_.shard_bytes, group_->size());
    nn::point_at(t.tensor, t.full);
  }
  gathered_ = Tensor();
  state_ = State::gathered;
}

void FsdpUnit::reshard() {
  if (state_ == State::sharded) return;
  if (state_ == State::gathering) {  // prefetched, never used
    gather_work_.wait();
    gather_work_ = Work();
    gathered_ = Tensor();
    state_ = State::sharded;
    return;
  }
  for (FsdpTensor& t : tensors_) {
    if (t.replicated) continue;
    t.full_version = t.full.storage()->version();
    nn::point_at(t.tensor, t.shard);
    t.full = Tensor();  // freed, unless autograd saved a view of it for backward
  }
  state_ = State::sharded;
}

std::vector<Tensor> FsdpUnit::gather_trainable() {
  autograd::NoGradGuard no_grad;
  const int world = group_->size();
  const size_t seg = sizes_.trainable_bytes;
  Tensor gathered;
  if (seg > 0) {
    Tensor mine = narrow(flat_, 0, 0, static_cast<int64_t>(seg));
    if (world == 1) {
      gathered = mine;
    } else {
      gathered = empty({static_cast<int64_t>(seg) * world}, DType::u8, flat_.device());  // (world * trainable bytes)
      group_->all_gather(gathered, mine).wait();
    }
  }
  std::vector<Tensor> out;
  for (const FsdpTensor& t : tensors_) {
    if (!t.trainable) continue;
    out.push_back(t.replicated ? t.shard.detach().clone() : unpack_gathered(t, gathered, seg, world));
  }
  return out;
}

// ---- hooks

void FsdpUnit::pre_forward(nn::Module::ForwardCall& call) {
  const bool grad = autograd::grad_enabled();
  const bool recompute = grad && schedule_->backward_running();
  if (grad) stash_gradients();
  unshard();
  // Recomputing inside backward: the backward markers prefetch (the forward order would fetch units done).
  if (!recompute) schedule_->prefetch(index_, /*forward=*/true, options_.prefetch);
  std::weak_ptr<FsdpUnit> weak = weak_from_this();
  mark(call.inputs, "fsdp_post_backward", [weak] {
    if (auto u = weak.lock()) u->post_backward();
  });
}

void FsdpUnit::post_forward(std::vector<Tensor>& outputs) {
  std::weak_ptr<FsdpUnit> weak = weak_from_this();
  mark(outputs, "fsdp_pre_backward", [weak] {
    if (auto u = weak.lock()) u->pre_backward();
  });
  if (options_.reshard_after_forward && !is_root() && !schedule_->in_backward) reshard();
}

void FsdpUnit::pre_backward() {
  schedule_->begin_backward();
  stash_gradients();
  unshard();
  schedule_->prefetch(index_, /*forward=*/false, options_.prefetch);
}

void FsdpUnit::post_backward() {
  if (!is_root()) reshard();
}

// ---- gradients

void FsdpUnit::stash_gradients() {
  for (FsdpTensor& t : tensors_) {
    if (!t.trainable) continue;
    Tensor g = t.tensor.grad();
    if (!g.defined()) continue;
    const Shape want = t.replicated ? t.shape : t.shard_shape();
    KILN_CHECK(g.shape() == want, "fully_shard", "{}: expected the gradient of '{}' to have the shard's shape {}, found {}",
               module_->type_name(), t.name, shape_str(want), shape_str(g.shape()));
    t.grad = t.grad.defined() ? add(t.grad, g) : g;
    t.tensor.zero_grad();
  }
}

void FsdpUnit::on_gradient(size_t index, const Tensor& leaf) {
  FsdpTensor& t = tensors_[index];
  Tensor g = leaf.grad();
  if (!g.defined()) return;
  autograd::NoGradGuard no_grad;
  const Device device = flat_.device();
  if (!reduction_) {
    reduction_ = std::make_unique<Reduction>();
    reduction_->arrived.assign(tensors_.size(), false);
    if (sizes_.grad_numel > 0)
      reduction_->scatter_in = zeros({sizes_.grad_numel * group_->size()}, options_.reduce_dtype, device);  // (world * grad_numel)
    if (sizes_.replicated_grad_numel > 0)
      reduction_->replicated = zeros({sizes_.replicated_grad_numel}, options_.reduce_dtype, device);  // (replicated grads)
  }
  Reduction& r = *reduction_;
  KILN_CHECK(!r.issued && !r.arrived[index], "fully_shard",
             "{}: '{}' received a gradient after its unit's reduction was issued in this backward (a tensor used by "
             "several checkpointed blocks?); fully_shard needs every use of a unit's tensors inside its forward",
             module_->type_name(), t.name);
  if (t.replicated) copy_(narrow(r.replicated, 0, t.grad_offset, kiln::numel(t.shape)), reshape(g, {-1}));
  else pack_gradient(t, g, r.scatter_in, sizes_.grad_numel, group_->size());
  leaf.impl_ref().grad.reset();
  r.arrived[index] = true;
  if (++r.count == trainable_count_) issue_reduction();
}

void FsdpUnit::issue_reduction() {
  if (!reduction_ || reduction_->issued) return;
  Reduction& r = *reduction_;
  r.issued = true;
  autograd::NoGradGuard no_grad;
  if (r.scatter_in.defined()) {
    r.scatter_out = empty({sizes_.grad_numel}, options_.reduce_dtype, flat_.device());  // (grad_numel)
    r.scatter_work = group_->reduce_scatter(r.scatter_out, r.scatter_in);
  }
  if (r.replicated.defined()) r.replicated_work = group_->all_reduce(r.replicated);
  if (!options_.async_reduce) {
    r.scatter_work.wait();
    r.replicated_work.wait();
  }
}

void FsdpUnit::finish_reduction() {
  if (!reduction_) return;
  issue_reduction();
  std::unique_ptr<Reduction> r = std::move(reduction_);
  autograd::NoGradGuard no_grad;
  r->scatter_work.wait();
  r->replicated_work.wait();
  r->scatter_in = Tensor();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    FsdpTensor& t = tensors_[i];
    if (!t.trainable || !r->arrived[i]) continue;  // every rank ran the same graph: none had a gradient
    Tensor g = t.replicated ? view(narrow(r->replicated, 0, t.grad_offset, kiln::numel(t.shape)), t.shape)
                            : view(narrow(r->scatter_out, 0, t.grad_offset, t.shard_numel()), t.shard_shape());
    if (options_.gradient_divide_factor != 1.0) g = div(g, options_.gradient_divide_factor);
    if (g.dtype() != t.dtype) g = cast(g, t.dtype);
    if (t.grad.defined()) g = add(t.grad, g);
    t.grad = Tensor();
    t.tensor.set_grad(g);
  }
}

// ---- construction

std::shared_ptr<FsdpUnit> find_unit(const nn::Module& module) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto it = registry().find(&module);
  return it == registry().end() ? nullptr : it->second.lock();
}

std::shared_ptr<FsdpUnit> fully_shard(nn::Module& module, std::shared_ptr<ProcessGroup> group,
                                      const FullyShardOptions& options) {
  KILN_CHECK(group != nullptr, "fully_shard", "expected a process group, found null");
  KILN_CHECK(options.prefetch >= 0 && options.replicate_below >= 0, "fully_shard",
             "expected prefetch >= 0 and replicate_below >= 0, found {} and {}", options.prefetch, options.replicate_below);
  KILN_CHECK(options.reduce_dtype == DType::f32 || options.reduce_dtype == DType::bf16, "fully_shard",
             "expected reduce_dtype f32 or bf16, found {}", dtype_name(options.reduce_dtype));
  KILN_CHECK(std::isfinite(options.gradient_divide_factor) && options.gradient_divide_factor > 0, "fully_shard",
             "expected a positive gradient_divide_factor, found {}", options.gradient_divide_factor);
  KILN_CHECK(find_unit(module) == nullptr, "fully_shard", "{} is already sharded", module.type_name());
  auto unit = std::shared_ptr<FsdpUnit>(new FsdpUnit(module, group, options));

  // The units below (bottom-up use) and the tensors outside them.
  std::vector<std::pair<std::string, std::shared_ptr<FsdpUnit>>> below;
  std::set<const TensorImpl*> seen, owned_below;
  std::vector<std::string> skip;  // path prefixes owned by units below
  for (auto& [path, m] : module.named_modules()) {
    const bool inside = std::any_of(skip.begin(), skip.end(), [&p = path](const std::string& s) { return p.rfind(s, 0) == 0; });
    if (inside) continue;
    if (m != &module) {
      if (auto sub = find_unit(*m)) {
        KILN_CHECK(sub->is_root(), "fully_shard", "'{}' belongs to a sharded module above it: apply fully_shard bottom-up", path);
        KILN_CHECK(sub->group_ == group, "fully_shard", "'{}' was sharded over another process group", path);
        below.emplace_back(path, sub);
        skip.push_back(path + ".");
        for (const auto& s : sub->schedule_units())
          for (const FsdpTensor& t : s->tensors_) owned_below.insert(t.tensor.impl().get());
        continue;
      }
    }
    const std::string prefix = path.empty() ? "" : path + ".";
    auto add = [&](const std::string& name, const Tensor& t, bool parameter) {
      KILN_CHECK(!t.defined() || !owned_below.count(t.impl().get()), "fully_shard",
                 "'{}{}' is also a tensor of a sharded module below; a tensor can belong to one unit only", prefix, name);
      if (!t.defined() || !seen.insert(t.impl().get()).second) return;  // tied: once
      FsdpTensor ft;
      ft.name = prefix + name;
      ft.tensor = t;
      ft.parameter = parameter;
      ft.trainable = parameter && t.requires_grad();
      unit->tensors_.push_back(std::move(ft));
    };
    for (const auto& [name, t] : m->named_parameters(/*recurse=*/false)) add(name, t, true);
    for (const auto& [name, t] : m->named_buffers(/*recurse=*/false)) add(name, t, false);
  }
  unit->shard_tensors();

  // One schedule: this unit, then each unit below with the units of its own schedule, in module order.
  auto schedule = std::make_shared<FsdpSchedule>();
  schedule->units.push_back(unit);
  for (auto& [path, sub] : below)
    for (const auto& s : sub->schedule_units()) schedule->units.push_back(s);
  std::map<const nn::Module*, std::string> paths;
  for (auto& [path, m] : module.named_modules()) paths[m] = path;
  for (size_t i = 0; i < schedule->units.size(); ++i) {
    auto u = schedule->unit(i);
    u->schedule_ = schedule;
    u->index_ = i;
    u->path_ = paths[u->module_];
  }
  unit->attach_hooks();
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  registry()[&module] = unit;
  return unit;
}

std::shared_ptr<FsdpUnit> shard_llama(nn::Llama& model, std::shared_ptr<ProcessGroup> group,
                                      const FullyShardOptions& options) {
  auto& layers = model.model().child_as<nn::ModuleList>("layers");
  for (int64_t i = 0; i < layers.size(); ++i) fully_shard(layers.at<nn::LlamaDecoderLayer>(i), group, options);
  return fully_shard(model, group, options);
}

// ---- global gradient norm

double clip_grad_norm_sharded(const std::vector<std::shared_ptr<FsdpUnit>>& units, const nn::NamedTensors& params,
                              double max_norm) {
  KILN_CHECK(!units.empty(), "clip_grad_norm", "expected the sharded units, found none");
  KILN_CHECK(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm", "max_norm must be finite and > 0, got {}", max_norm);
  autograd::NoGradGuard no_grad;
  std::set<const TensorImpl*> sharded;
  for (const auto& u : units)
    for (const FsdpTensor& t : u->tensors())
      if (!t.replicated) sharded.insert(t.tensor.impl().get());
  const Device device = units[0]->tensors().empty() ? kCPU : units[0]->tensors()[0].tensor.device();
  std::vector<Tensor> parts[2];  // [0] sharded, [1] replicated
  for (const auto& [name, p] : params) {
    Tensor g = p.grad();
    if (g.defined()) parts[sharded.count(p.impl().get()) ? 0 : 1].push_back(g);
  }
  auto sum_sq = [](const std::vector<Tensor>& gs) {
    double s = 0;
    std::vector<Tensor> dense;
    for (const Tensor& g : gs) {
      const bool fused = (g.dtype() == DType::f32 || g.dtype() == DType::bf16 || g.dtype() == DType::f16) && g.is_contiguous();
      if (fused) dense.push_back(g);
      else s += sum(square(cast(g, DType::f64))).item<double>();
    }
    if (!dense.empty()) {
      const double n = multi_tensor_l2_norm(dense).item<double>();
      s += n * n;
    }
    return s;
  };
  // Every rank takes part in the all_reduce, with or without gradients.
  Tensor total = from_vector<double>({sum_sq(parts[0])}, {1}, device);
  units[0]->group().all_reduce(total).wait();
  const double norm = std::sqrt(total.to(kCPU).item<double>() + sum_sq(parts[1]));
  units[0]->group().check_ok();
  const double coef = max_norm / (norm + 1e-6);
  if (std::isfinite(norm) && coef < 1.0) {
    for (const auto& gs : parts) {
      std::vector<Tensor> dense;
      for (const Tensor& g : gs) {
        if ((g.dtype() == DType::f32 || g.dtype() == DType::bf16 || g.dtype() == DType::f16) && g.is_contiguous()) dense.push_back(g);
        else copy_(g, mul(cast(g, DType::f32), coef));
      }
      if (!dense.empty()) multi_tensor_scale_(dense, coef);
    }
  }
  return norm;
}

}  // namespace kiln::dist

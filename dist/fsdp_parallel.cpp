// FsdpParallel: scalar sums, the plain data-parallel gradient all_reduce (one flat buffer), and the
// sharded path's hand-offs to fully_shard (global clip) and sharded_checkpoint.
#include "dist/fsdp_parallel.h"

#include <set>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "dist/sharded_checkpoint.h"

namespace kiln::dist {

FsdpParallel::FsdpParallel(std::shared_ptr<ProcessGroup> group, Device device, std::shared_ptr<FsdpUnit> root)
    : group_(std::move(group)), device_(device), root_(std::move(root)) {
  KILN_CHECK(group_ != nullptr, "FsdpParallel", "expected a process group, found null");
  KILN_CHECK(!root_ || &root_->group() == group_.get(), "FsdpParallel",
             "expected the model sharded over the same process group");
}

void FsdpParallel::all_reduce_sum(std::vector<double>& values) {
  if (values.empty() || group_->size() == 1) return;
  Tensor t = from_vector<double>(values, {static_cast<int64_t>(values.size())}, device_);
  group_->all_reduce(t).wait();
  values = t.to(kCPU).to_vector<double>();
  group_->check_ok();
}

void FsdpParallel::all_reduce_gradients(const nn::NamedTensors& params) {
  if (root_) {
    if (checked_) return;
    std::set<const TensorImpl*> managed;
    for (const auto& u : root_->schedule_units())
      for (const FsdpTensor& t : u->tensors()) managed.insert(t.tensor.impl().get());
    for (const auto& [name, p] : params)
      KILN_CHECK(managed.count(p.impl().get()), "FsdpParallel",
                 "parameter '{}' is not sharded by fully_shard, so nothing reduces its gradient", name);
    checked_ = true;
    return;
  }
  if (group_->size() == 1 || params.empty()) return;
  autograd::NoGradGuard no_grad;
  const auto n = static_cast<int64_t>(params.size());
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (const auto& [name, p] : params) {
    offsets.push_back(total);
    total += p.numel();
  }
  Tensor flat = zeros({total + n}, DType::f32, device_);  // (every gradient, then one has-gradient flag each)
  for (int64_t i = 0; i < n; ++i) {
    const Tensor g = params[static_cast<size_t>(i)].second.grad();
    if (!g.defined()) continue;
    copy_(narrow(flat, 0, offsets[static_cast<size_t>(i)], g.numel()), reshape(g, {-1}));
    fill_(narrow(flat, 0, total + i, 1), 1.0);
  }
  group_->all_reduce(flat).wait();
  const std::vector<float> flags = narrow(flat, 0, total, n).to(kCPU).to_vector<float>();
  group_->check_ok();  // the sums are read: a failed group's would be garbage
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[static_cast<size_t>(i)].second;
    if (flags[static_cast<size_t>(i)] == 0) continue;  // no rank had a gradient
    Tensor g = view(narrow(flat, 0, offsets[static_cast<size_t>(i)], p.numel()), p.shape());
    p.impl_ref().grad = (g.dtype() == p.dtype() ? g : cast(g, p.dtype())).impl();
  }
}

double FsdpParallel::clip_grad_norm(const nn::NamedTensors& params, double max_norm) {
  if (!root_) return nn::clip_grad_norm_(params, max_norm);  // every rank holds the whole summed gradient
  return clip_grad_norm_sharded(root_->schedule_units(), params, max_norm);
}

std::string FsdpParallel::save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                                          const nn::Optimizer& optimizer, const train::TrainerState& state) {
  if (root_) return save_sharded_checkpoint(output, *root_, optimizer, state);
  group_->check_ok();  // no checkpoint of a step whose gradients a failed group summed
  std::string path = DataParallel::save_checkpoint(output, model, lora, optimizer, state);
  group_->barrier().wait();  // the folder is complete when any rank returns
  return path;
}

train::TrainerState FsdpParallel::load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                                                  const std::string& fingerprint) {
  if (root_) return load_sharded_checkpoint(dir, *root_, optimizer, fingerprint);
  return DataParallel::load_checkpoint(dir, model, optimizer, fingerprint);
}

}  // namespace kiln::dist

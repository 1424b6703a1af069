// Optimizer base (grads, lr, state dicts with all-or-nothing loading, safetensors save/load),
// AdamW over the fused adamw_step_ primitive, SGD written with kiln ops, and clip_grad_norm_.
#include "nn/optim.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "core/ops/optim.h"
#include "io/safetensors.h"

namespace kiln::nn {
namespace {

constexpr const char* kFormat = "kiln.optimizer";

void check_finite_nonneg(double v, const char* what, const char* op) {
  KILN_CHECK(std::isfinite(v) && v >= 0.0, op, "{} must be finite and >= 0, got {}", what, v);
}

// "<param name>.<key>" -> (name, key), split at the last dot.
std::pair<std::string, std::string> split_key(const std::string& k) {
  const size_t dot = k.rfind('.');
  if (dot == std::string::npos) return {k, ""};
  return {k.substr(0, dot), k.substr(dot + 1)};
}

double get_hyper(const std::map<std::string, double>& h, const std::string& key, const char* op) {
  auto it = h.find(key);
  KILN_CHECK(it != h.end(), op, "hyperparameter '{}' is missing", key);
  return it->second;
}

void check_hyper_keys(const std::map<std::string, double>& h, const std::vector<std::string>& keys, const char* op) {
  for (const auto& [k, v] : h) {
    KILN_CHECK(std::find(keys.begin(), keys.end(), k) != keys.end(), op, "unknown hyperparameter '{}'", k);
  }
  for (const std::string& k : keys) get_hyper(h, k, op);
}

}  // namespace

// ---------------------------------------------------------------- Optimizer

Optimizer::Optimizer(NamedTensors params, double lr) : params_(std::move(params)), lr_(lr) {
  std::set<std::string> seen;
  for (const auto& [name, p] : params_) {
    KILN_CHECK(!name.empty(), "optim", "parameter names must be non-empty");
    KILN_CHECK(seen.insert(name).second, "optim", "parameter '{}' is listed twice", name);
    KILN_CHECK(p.defined(), "optim", "parameter '{}' is an undefined tensor", name);
    KILN_CHECK(is_floating(p.dtype()), "optim", "parameter '{}' has dtype {}, expected a floating dtype", name,
               dtype_name(p.dtype()));
  }
  state_.resize(params_.size());
  param_steps_.assign(params_.size(), 0);
}

void Optimizer::zero_grad() {
  for (auto& [name, p] : params_) p.zero_grad();
}

void Optimizer::set_lr(double lr) {
  check_finite_nonneg(lr, "lr", "optim");
  lr_ = lr;
}

const std::map<std::string, Tensor>& Optimizer::state(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].first == name) return state_[i];
  }
  KILN_FAIL("optim", "no parameter named '{}'", name);
}

size_t Optimizer::pending_state_bytes() const {
  const size_t per_element = state_keys().size() * itemsize(DType::f32);
  size_t bytes = 0;
  for (size_t i = 0; i < params_.size(); ++i)
    if (state_[i].empty()) bytes += static_cast<size_t>(params_[i].second.numel()) * per_element;
  return bytes;
}

OptimizerState Optimizer::state_dict() const {
  OptimizerState s;
  s.type = type();
  s.step = step_;
  s.hyper = hyperparameters();
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    s.params.push_back(name);
    if (state_[i].empty()) continue;
    for (const auto& [k, t] : state_[i]) s.tensors[name + "." + k] = t;
    s.tensors[name + ".step"] = from_vector<int64_t>({param_steps_[i]}, {1});
  }
  return s;
}

void Optimizer::load_state_dict(const OptimizerState& s) {
  KILN_CHECK(s.type == type(), "optim", "the state is for optimizer type '{}', this optimizer is {}", s.type, type());
  KILN_CHECK(s.step >= 0, "optim", "step must be >= 0, got {}", s.step);
  // Parameter names: the same set on both sides.
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < params_.size(); ++i) index[params_[i].first] = i;
  std::set<std::string> listed;
  for (const std::string& name : s.params) {
    KILN_CHECK(index.count(name), "optim", "the state has parameter '{}', which this optimizer does not", name);
    KILN_CHECK(listed.insert(name).second, "optim", "the state lists parameter '{}' twice", name);
  }
  for (const auto& [name, p] : params_) {
    KILN_CHECK(listed.count(name), "optim", "parameter '{}' is missing from the state", name);
  }
  // Hyperparameters first (the state keys of SGD depend on momentum); restored on any failure.
  const std::map<std::string, double> old = hyperparameters();
  set_hyperparameters(s.hyper);
  std::vector<std::map<std::string, Tensor>> state(params_.size());
  std::vector<int64_t> steps(params_.size(), 0);
  try {
    load_tensors(s, index, state, steps);
  } catch (...) {
    set_hyperparameters(old);
    throw;
  }
  state_ = std::move(state);
  param_steps_ = std::move(steps);
  step_ = s.step;
}

// Validates s.tensors against the parameters (every key known, shapes and dtypes right, complete
// per parameter) and copies them onto the parameters' devices.
void Optimizer::load_tensors(const OptimizerState& s, const std::map<std::string, size_t>& index,
                             std::vector<std::map<std::string, Tensor>>& state, std::vector<int64_t>& steps) const {
  const std::vector<std::string> keys = state_keys();
  std::vector<bool> has(params_.size(), false);
  for (const auto& [key, t] : s.tensors) {
    auto [name, k] = split_key(key);
    auto it = index.find(name);
    KILN_CHECK(it != index.end(), "optim", "state tensor '{}' names no parameter of this optimizer", key);
    const Tensor& p = params_[it->second].second;
    KILN_CHECK(t.defined(), "optim", "state tensor '{}' is undefined", key);
    has[it->second] = true;
    if (k == "step") {
      KILN_CHECK(t.dtype() == DType::i64 && t.numel() == 1, "optim", "state tensor '{}' must be one i64, found {} {}",
                 key, dtype_name(t.dtype()), shape_str(t.shape()));
      steps[it->second] = t.item<int64_t>();
      KILN_CHECK(steps[it->second] >= 1, "optim", "state tensor '{}' must be >= 1, found {}", key, steps[it->second]);
      continue;
    }
    KILN_CHECK(std::find(keys.begin(), keys.end(), k) != keys.end(), "optim",
               "state tensor '{}': '{}' is not a state key of {}", key, k, type());
    KILN_CHECK(t.shape() == p.shape(), "optim", "state tensor '{}' has shape {}, parameter '{}' has shape {}", key,
               shape_str(t.shape()), name, shape_str(p.shape()));
    KILN_CHECK(t.dtype() == DType::f32, "optim", "state tensor '{}' has dtype {}, expected f32", key,
               dtype_name(t.dtype()));
    state[it->second][k] = t;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!has[i]) continue;
    const std::string& name = params_[i].first;
    KILN_CHECK(steps[i] >= 1, "optim", "parameter '{}' has state but no '{}.step'", name, name);
    for (const std::string& k : keys) {
      KILN_CHECK(state[i].count(k), "optim", "parameter '{}' has state but no '{}.{}'", name, name, k);
    }
  }
  // Owned copies on each parameter's device (never aliasing the source, e.g. a file mapping).
  for (size_t i = 0; i < params_.size(); ++i) {
    for (auto& [k, t] : state[i]) {
      Tensor moved = to_device(contiguous(t), params_[i].second.device());
      t = moved.storage() == t.storage() ? moved.clone() : moved;
    }
  }
}

void Optimizer::save(const std::string& path) const {
  const OptimizerState s = state_dict();
  std::vector<std::pair<std::string, Tensor>> tensors(s.tensors.begin(), s.tensors.end());
  nlohmann::json hyper = nlohmann::json::object();
  for (const auto& [k, v] : s.hyper) hyper[k] = v;
  std::map<std::string, std::string> meta{{"format", kFormat},
                                          {"type", s.type},
                                          {"step", std::to_string(s.step)},
                                          {"hyperparameters", hyper.dump()},
                                          {"params", nlohmann::json(s.params).dump()}};
  io::save_safetensors(path, tensors, meta);
}

void Optimizer::load(const std::string& path) {
  io::SafetensorsFile f = io::SafetensorsFile::open(path);
  const auto& meta = f.metadata();
  auto field = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    KILN_CHECK(it != meta.end(), "optim", "{}: metadata has no '{}' (not a kiln optimizer state file)", path, key);
    return it->second;
  };
  KILN_CHECK(field("format") == kFormat, "optim", "{}: format is '{}', expected '{}'", path, field("format"), kFormat);
  OptimizerState s;
  s.type = field("type");
  try {
    s.step = std::stoll(field("step"));
    const nlohmann::json hyper = nlohmann::json::parse(field("hyperparameters"));
    KILN_CHECK(hyper.is_object(), "optim", "{}: hyperparameters are not a JSON object", path);
    for (const auto& [k, v] : hyper.items()) s.hyper[k] = v.get<double>();
    s.params = nlohmann::json::parse(field("params")).get<std::vector<std::string>>();
  } catch (const kiln::Error&) {
    throw;
  } catch (const std::exception& e) {
    KILN_FAIL("optim", "{}: malformed metadata: {}", path, e.what());
  }
  for (const std::string& k : f.keys()) s.tensors[k] = f.get(k);
  load_state_dict(s);
}

// ---------------------------------------------------------------- AdamW

AdamW::AdamW(NamedTensors params, AdamWOptions options) : Optimizer(std::move(params), options.lr) {
  set_hyperparameters({{"lr", options.lr},
                       {"beta1", options.beta1},
                       {"beta2", options.beta2},
                       {"eps", options.eps},
                       {"weight_decay", options.weight_decay}});
}

AdamWOptions AdamW::options() const {
  AdamWOptions o = o_;
  o.lr = lr_;
  return o;
}

std::map<std::string, double> AdamW::hyperparameters() const {
  return {{"lr", lr_}, {"beta1", o_.beta1}, {"beta2", o_.beta2}, {"eps", o_.eps}, {"weight_decay", o_.weight_decay}};
}

void AdamW::set_hyperparameters(const std::map<std::string, double>& h) {
  check_hyper_keys(h, {"lr", "beta1", "beta2", "eps", "weight_decay"}, "adamw");
  AdamWOptions o;
  o.lr = get_hyper(h, "lr", "adamw");
  o.beta1 = get_hyper(h, "beta1", "adamw");
  o.beta2 = get_hyper(h, "beta2", "adamw");
  o.eps = get_hyper(h, "eps", "adamw");
  o.weight_decay = get_hyper(h, "weight_decay", "adamw");
  check_finite_nonneg(o.lr, "lr", "adamw");
  check_finite_nonneg(o.eps, "eps", "adamw");
  check_finite_nonneg(o.weight_decay, "weight_decay", "adamw");
  KILN_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0 && o.beta2 >= 0.0 && o.beta2 < 1.0, "adamw",
             "betas must be in [0, 1), got ({}, {})", o.beta1, o.beta2);
  o_ = o;
  lr_ = o.lr;
}

void AdamW::step() {
  autograd::NoGradGuard no_grad;
  struct Group {
    Device device;
    DType dtype;
    std::vector<Tensor> p, g, m, v;
    std::vector<int64_t> steps;
  };
  std::vector<Group> groups;  // one fused update per (device, dtype)
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    Tensor g = p.grad();
    if (!g.defined()) continue;
    KILN_CHECK(g.shape() == p.shape() && g.device() == p.device(), "adamw",
               "grad of '{}' is {} on {}, the parameter {} on {}", name, shape_str(g.shape()), g.device().str(),
               shape_str(p.shape()), p.device().str());
    KILN_CHECK(p.is_contiguous(), "adamw", "parameter '{}' must be contiguous", name);
    if (g.dtype() != p.dtype()) g = cast(g, p.dtype());
    auto& st = state_[i];
    if (st.empty()) {
      st["exp_avg"] = zeros(p.shape(), DType::f32, p.device());
      st["exp_avg_sq"] = zeros(p.shape(), DType::f32, p.device());
    }
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&t = p](const Group& gr) { return gr.device == t.device() && gr.dtype == t.dtype(); });
    if (it == groups.end()) it = groups.insert(groups.end(), Group{p.device(), p.dtype(), {}, {}, {}, {}, {}});
    it->p.push_back(p);
    it->g.push_back(g);
    it->m.push_back(st["exp_avg"]);
    it->v.push_back(st["exp_avg_sq"]);
    it->steps.push_back(param_steps_[i] + 1);
  }
  const AdamWHyper h{lr_, o_.beta1, o_.beta2, o_.eps, o_.weight_decay};
  for (const Group& gr : groups) adamw_step_(gr.p, gr.g, gr.m, gr.v, gr.steps, h);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].second.grad().defined()) ++param_steps_[i];
  }
  ++step_;
}

// ---------------------------------------------------------------- SGD

SGD::SGD(NamedTensors params, SGDOptions options) : Optimizer(std::move(params), options.lr) {
  set_hyperparameters({{"lr", options.lr},
                       {"momentum", options.momentum},
                       {"dampening", options.dampening},
                       {"nesterov", options.nesterov ? 1.0 : 0.0},
                       {"weight_decay", options.weight_decay}});
}

SGDOptions SGD::options() const {
  SGDOptions o = o_;
  o.lr = lr_;
  return o;
}

std::map<std::string, double> SGD::hyperparameters() const {
  return {{"lr", lr_},
          {"momentum", o_.momentum},
          {"dampening", o_.dampening},
          {"nesterov", o_.nesterov ? 1.0 : 0.0},
          {"weight_decay", o_.weight_decay}};
}

void SGD::set_hyperparameters(const std::map<std::string, double>& h) {
  check_hyper_keys(h, {"lr", "momentum", "dampening", "nesterov", "weight_decay"}, "sgd");
  SGDOptions o;
  o.lr = get_hyper(h, "lr", "sgd");
  o.momentum = get_hyper(h, "momentum", "sgd");
  o.dampening = get_hyper(h, "dampening", "sgd");
  const double nesterov = get_hyper(h, "nesterov", "sgd");
  o.weight_decay = get_hyper(h, "weight_decay", "sgd");
  check_finite_nonneg(o.lr, "lr", "sgd");
  check_finite_nonneg(o.momentum, "momentum", "sgd");
  check_finite_nonneg(o.weight_decay, "weight_decay", "sgd");
  KILN_CHECK(std::isfinite(o.dampening), "sgd", "dampening must be finite, got {}", o.dampening);
  KILN_CHECK(nesterov == 0.0 || nesterov == 1.0, "sgd", "nesterov must be 0 or 1, got {}", nesterov);
  o.nesterov = nesterov == 1.0;
  KILN_CHECK(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0), "sgd",
             "nesterov momentum requires momentum > 0 and dampening 0, got momentum {} and dampening {}", o.momentum,
             o.dampening);
  o_ = o;
  lr_ = o.lr;
}

std::vector<std::string> SGD::state_keys() const {
  if (o_.momentum == 0.0) return {};
  return {"momentum_buffer"};
}

void SGD::step() {
  autograd::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    const Tensor grad = p.grad();
    if (!grad.defined()) continue;
    KILN_CHECK(grad.shape() == p.shape() && grad.device() == p.device(), "sgd",
               "grad of '{}' is {} on {}, the parameter {} on {}", name, shape_str(grad.shape()), grad.device().str(),
               shape_str(p.shape()), p.device().str());
    const Tensor pf = cast(p, DType::f32);
    Tensor d = cast(grad, DType::f32);
    if (o_.weight_decay != 0.0) d = add(d, mul(pf, o_.weight_decay));
    if (o_.momentum != 0.0) {
      auto& st = state_[i];
      auto it = st.find("momentum_buffer");
      if (it == st.end()) {
        it = st.emplace("momentum_buffer", contiguous(d).clone()).first;
      } else {
        copy_(it->second, add(mul(it->second, o_.momentum), mul(d, 1.0 - o_.dampening)));
      }
      d = o_.nesterov ? add(d, mul(it->second, o_.momentum)) : it->second;
    }
    copy_(p, sub(pf, mul(d, lr_)));
    ++param_steps_[i];
  }
  ++step_;
}

// ---------------------------------------------------------------- clip_grad_norm_

double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm) {
  KILN_CHECK(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm", "max_norm must be finite and > 0, got {}",
             max_norm);
  autograd::NoGradGuard no_grad;
  std::vector<Tensor> grads;
  std::vector<Device> devices;
  for (const Tensor& p : params) {
    KILN_CHECK(p.defined(), "clip_grad_norm", "undefined parameter in the list");
    Tensor g = p.grad();
    if (!g.defined()) continue;
    grads.push_back(g);
    if (std::find(devices.begin(), devices.end(), g.device()) == devices.end()) devices.push_back(g.device());
  }
  if (grads.empty()) return 0.0;
  // Per device: the fused multi-tensor L2 norm of its f32/bf16/f16 grads (one launch, f32
  // accumulation; other dtypes, e.g. f64, by per-tensor ops), one 0-d tensor read back per device.
  // Several devices combine as the norm of the per-device norms.
  const auto fused = [](const Tensor& g) {
    return (g.dtype() == DType::f32 || g.dtype() == DType::bf16 || g.dtype() == DType::f16) && g.is_contiguous();
  };
  std::vector<double> device_norms;
  for (const Device& dev : devices) {
    std::vector<Tensor> dense;  // (k) grads of the fused kernels
    Tensor rest_sq;             // () f32 sum of squares of the others
    for (const Tensor& g : grads) {
      if (g.device() != dev) continue;
      if (fused(g)) {
        dense.push_back(g);
      } else {
        const Tensor sq = sum(square(cast(g, DType::f32)));
        rest_sq = rest_sq.defined() ? add(rest_sq, sq) : sq;
      }
    }
    Tensor dn = dense.empty() ? Tensor() : multi_tensor_l2_norm(dense);  // ()
    if (rest_sq.defined()) dn = sqrt(dn.defined() ? add(square(dn), rest_sq) : rest_sq);
    device_norms.push_back(dn.item<double>());
  }
  double total_sq = 0.0;
  for (double dn : device_norms) total_sq += dn * dn;
  const double norm = device_norms.size() == 1 ? device_norms[0] : std::sqrt(total_sq);
  const double coef = max_norm / (norm + 1e-6);
  // A non-finite norm (inf/NaN grads) leaves the grads as they are.
  if (std::isfinite(norm) && coef < 1.0) {
    // In f32 (a double scalar would take a bf16 grad's dtype and round the coefficient), in place:
    // one launch per device for the fused dtypes.
    for (const Device& dev : devices) {
      std::vector<Tensor> dense;  // (k) grads scaled by the fused kernel
      for (const Tensor& g : grads) {
        if (g.device() != dev) continue;
        if (fused(g)) dense.push_back(g);
        else copy_(g, mul(cast(g, DType::f32), coef));
      }
      multi_tensor_scale_(dense, coef);
    }
  }
  return norm;
}

double clip_grad_norm_(const NamedTensors& params, double max_norm) {
  std::vector<Tensor> ts;
  ts.reserve(params.size());
  for (const auto& [name, p] : params) ts.push_back(p);
  return clip_grad_norm_(ts, max_norm);
}

}  // namespace kiln::nn

// Module: registration, traversal by dotted names, device/dtype moves in place, train/eval, and
// state dicts with strict and non-strict loading that validate everything before copying.
#include "nn/module.h"

#include <algorithm>
#include <set>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "core/registry.h"

namespace kiln::nn {

namespace {

std::string join(const std::string& prefix, const std::string& name) { return prefix.empty() ? name : prefix + "." + name; }

}  // namespace

void point_at(const Tensor& target, const Tensor& value) {
  TensorImpl& t = target.impl_ref();
  const TensorImpl& v = value.impl_ref();
  t.storage = v.storage;
  t.offset = v.offset;
  t.shape = v.shape;
  t.strides = v.strides;
  t.dtype = v.dtype;
  t.device = v.device;
}

void assign_data(const Tensor& target, const Tensor& value) {
  point_at(target, value);
  target.impl_ref().grad.reset();
}

namespace {

Module::ModuleCompiler& module_compiler() {
  static Module::ModuleCompiler compiler;
  return compiler;
}

}  // namespace

void Module::set_module_compiler(ModuleCompiler compiler) { module_compiler() = std::move(compiler); }

void Module::compile() {
  run_registrations();  // kiln_compile installs the compiler through KILN_REGISTER
  KILN_CHECK(module_compiler() != nullptr, "compile", "{}.compile() needs kiln_compile linked (kiln_dep links it)",
             type_name());
  module_compiler()(*this);
}

void Module::check_new_name(const std::string& name) const {
  KILN_CHECK(!name.empty() && name.find('.') == std::string::npos, "Module",
             "{}: a registered name must be non-empty and contain no '.', found '{}'", type_name(), name);
  auto same = [&](const auto& s) { return s.name == name; };
  const bool taken = std::any_of(parameters_.begin(), parameters_.end(), same) ||
                     std::any_of(buffers_.begin(), buffers_.end(), same) ||
                     std::any_of(children_.begin(), children_.end(), [&](const auto& c) { return c.first == name; });
  KILN_CHECK(!taken, "Module", "{}: the name '{}' is already registered", type_name(), name);
}

Tensor Module::register_parameter(const std::string& name, Tensor t, bool requires_grad) {
  check_new_name(name);
  KILN_CHECK(t.defined(), "Module", "{}: parameter '{}' is an undefined tensor", type_name(), name);
  if (is_floating(t.dtype()) && t.is_leaf()) t.set_requires_grad(requires_grad);
  parameters_.push_back({name, t, true, true});
  return t;
}

Tensor Module::register_buffer(const std::string& name, Tensor t, bool persistent, bool castable) {
  check_new_name(name);
  KILN_CHECK(t.defined(), "Module", "{}: buffer '{}' is an undefined tensor", type_name(), name);
  buffers_.push_back({name, t, persistent, castable});
  return t;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name);
  KILN_CHECK(module != nullptr, "Module", "{}: child '{}' is null", type_name(), name);
  children_.emplace_back(name, std::move(module));
}

void Module::replace_module(const std::string& name, std::shared_ptr<Module> module) {
  KILN_CHECK(module != nullptr, "Module", "{}: replacement for '{}' is null", type_name(), name);
  for (auto& [n, m] : children_) {
    if (n == name) {
      m = std::move(module);
      return;
    }
  }
  KILN_FAIL("Module", "{} has no child '{}'", type_name(), name);
}

Tensor Module::parameter(const std::string& name) const {
  for (const Slot& s : parameters_)
    if (s.name == name) return s.tensor;
  KILN_FAIL("Module", "{} has no parameter '{}'", type_name(), name);
}

bool Module::has_parameter(const std::string& name) const {
  return std::any_of(parameters_.begin(), parameters_.end(), [&](const Slot& s) { return s.name == name; });
}

Tensor Module::buffer(const std::string& name) const {
  for (const Slot& s : buffers_)
    if (s.name == name) return s.tensor;
  KILN_FAIL("Module", "{} has no buffer '{}'", type_name(), name);
}

std::shared_ptr<Module> Module::child(const std::string& name) const {
  for (const auto& [n, m] : children_)
    if (n == name) return m;
  KILN_FAIL("Module", "{} has no child module '{}'", type_name(), name);
}

void Module::throw_wrong_child_type(const std::string& name) const {
  KILN_FAIL("Module", "{}: child '{}' is a {}, not of the type asked for", type_name(), name, child(name)->type_name());
}

std::shared_ptr<Module> Module::find_module(const std::string& path) {
  KILN_CHECK(!path.empty(), "Module", "find_module needs a non-empty path");
  std::shared_ptr<Module> m;
  Module* cur = this;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    m = cur->child(path.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) return m;
    cur = m.get();
    start = dot + 1;
  }
}

void Module::collect_parameters(const std::string& prefix, bool recurse, NamedTensors& out) const {
  for (const Slot& s : parameters_) out.emplace_back(join(prefix, s.name), s.tensor);
  if (!recurse) return;
  for (const auto& [n, m] : children_) m->collect_parameters(join(prefix, n), true, out);
}

void Module::collect_buffers(const std::string& prefix, bool recurse, bool persistent_only, NamedTensors& out) const {
  for (const Slot& s : buffers_)
    if (s.persistent || !persistent_only) out.emplace_back(join(prefix, s.name), s.tensor);
  if (!recurse) return;
  for (const auto& [n, m] : children_) m->collect_buffers(join(prefix, n), true, persistent_only, out);
}

NamedTensors Module::named_parameters(bool recurse) const {
  NamedTensors out;
  collect_parameters("", recurse, out);
  // A tensor registered twice (tied embeddings) is listed once, under its first name.
  std::set<const TensorImpl*> seen;
  NamedTensors unique;
  for (auto& p : out)
    if (seen.insert(p.second.impl().get()).second) unique.push_back(std::move(p));
  return unique;
}

std::vector<Tensor> Module::parameters(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [n, t] : named_parameters(recurse)) out.push_back(t);
  return out;
}

NamedTensors Module::named_trainable_parameters() const {
  NamedTensors out;
  for (auto& p : named_parameters())
    if (p.second.requires_grad()) out.push_back(p);
  return out;
}

std::vector<Tensor> Module::trainable_parameters() const {
  std::vector<Tensor> out;
  for (auto& [n, t] : named_trainable_parameters()) out.push_back(t);
  return out;
}

NamedTensors Module::named_buffers(bool recurse) const {
  NamedTensors out;
  collect_buffers("", recurse, false, out);
  return out;
}

std::vector<std::pair<std::string, std::shared_ptr<Module>>> Module::named_children() const { return children_; }

std::vector<std::pair<std::string, Module*>> Module::named_modules() {
  std::vector<std::pair<std::string, Module*>> out;
  // Depth first in registration order, as named_parameters() lists tensors.
  auto visit = [&](auto&& self, const std::string& prefix, Module* m) -> void {
    out.emplace_back(prefix, m);
    for (auto& [n, c] : m->children_) self(self, join(prefix, n), c.get());
  };
  visit(visit, "", this);
  return out;
}

int64_t Module::num_parameters(bool trainable_only) const {
  int64_t n = 0;
  for (auto& [name, t] : named_parameters())
    if (!trainable_only || t.requires_grad()) n += t.numel();
  return n;
}

void Module::apply_to(std::optional<Device> device, std::optional<DType> dtype) {
  autograd::NoGradGuard no_grad;
  auto move = [&](Slot& s) {
    const Tensor& t = s.tensor;
    const bool cast_it = dtype && s.castable && is_floating(t.dtype()) && t.dtype() != *dtype;
    const bool move_it = device && t.device() != *device;
    if (!cast_it && !move_it) return;
    Tensor moved = move_it ? to_device(t, *device) : t;
    if (cast_it) moved = cast(moved, *dtype);
    assign_data(t, moved);
  };
  for (Slot& s : parameters_) move(s);
  for (Slot& s : buffers_) move(s);
  for (auto& [n, m] : children_) m->apply_to(device, dtype);
}

void Module::train(bool on) {
  for (auto& [n, m] : named_modules()) {
    (void)n;
    m->training_ = on;
    m->on_train(on);
  }
}

void Module::requires_grad_(bool requires_grad) {
  for (auto& [n, t] : named_parameters())
    if (is_floating(t.dtype())) t.set_requires_grad(requires_grad);
}

void Module::zero_grad() {
  for (auto& [n, t] : named_parameters()) t.zero_grad();
}

StateDict Module::state_dict() const {
  NamedTensors all;
  collect_parameters("", true, all);
  collect_buffers("", true, true, all);
  StateDict out;
  for (auto& [n, t] : all) out.emplace(n, t);
  return out;
}

LoadResult Module::load_state_dict(const StateDict& state, bool strict) {
  const StateDict own = state_dict();
  LoadResult result;
  for (const auto& [name, t] : own)
    if (!state.count(name)) result.missing_keys.push_back(name);
  for (const auto& [name, t] : state)
    if (!own.count(name)) result.unexpected_keys.push_back(name);
  if (strict) {
    auto list = [](const std::vector<std::string>& keys) {
      std::string s;
      for (size_t i = 0; i < keys.size() && i < 8; ++i) s += (i ? ", " : "") + keys[i];
      if (keys.size() > 8) s += fmt::format(", ... ({} in all)", keys.size());
      return s;
    };
    KILN_CHECK(result.missing_keys.empty(), "load_state_dict", "{}: missing keys: {}", type_name(),
               list(result.missing_keys));
    KILN_CHECK(result.unexpected_keys.empty(), "load_state_dict", "{}: unexpected keys: {}", type_name(),
               list(result.unexpected_keys));
  }
  // Validate every shape and dtype class first: a failing load changes nothing.
  for (const auto& [name, dst] : own) {
    auto it = state.find(name);
    if (it == state.end()) continue;
    const Tensor& src = it->second;
    KILN_CHECK(src.defined(), "load_state_dict", "key '{}' holds an undefined tensor", name);
    KILN_CHECK(src.shape() == dst.shape(), "load_state_dict", "key '{}': expected shape {}, found {}", name,
               shape_str(dst.shape()), shape_str(src.shape()));
    KILN_CHECK(is_floating(src.dtype()) == is_floating(dst.dtype()), "load_state_dict",
               "key '{}': expected dtype {}, found {}", name, dtype_name(dst.dtype()), dtype_name(src.dtype()));
  }
  autograd::NoGradGuard no_grad;
  for (const auto& [name, dst] : own) {
    auto it = state.find(name);
    if (it != state.end() && it->second.impl() != dst.impl()) copy_(dst, it->second);
  }
  return result;
}

// ---- forward hooks

struct Module::Hooks {
  template <class F>
  struct Entry {
    uint64_t id;
    F fn;
  };
  std::vector<Entry<ForwardPreHook>> pre;
  std::vector<Entry<ForwardPostHook>> post;
  std::vector<Entry<ForwardWrapper>> wrappers;
  uint64_t next_id = 0;
  bool empty() const { return pre.empty() && post.empty() && wrappers.empty(); }
};

bool Module::has_forward_hooks() const { return hooks_ && !hooks_->empty(); }

namespace {

template <class F, class List>
HookHandle add_hook(const std::shared_ptr<Module::Hooks>& hooks, List Module::Hooks::*list, F fn, const char* what) {
  KILN_CHECK(static_cast<bool>(fn), what, "the hook is empty");
  const uint64_t id = hooks->next_id++;
  ((*hooks).*list).push_back({id, std::move(fn)});
  std::weak_ptr<Module::Hooks> weak = hooks;
  return HookHandle([weak, list, id] {
    if (auto h = weak.lock()) std::erase_if((*h).*list, [id](const auto& e) { return e.id == id; });
  });
}

}  // namespace

HookHandle Module::register_forward_pre_hook(ForwardPreHook hook) {
  if (!hooks_) hooks_ = std::make_shared<Hooks>();
  return add_hook(hooks_, &Hooks::pre, std::move(hook), "register_forward_pre_hook");
}

HookHandle Module::register_forward_post_hook(ForwardPostHook hook) {
  if (!hooks_) hooks_ = std::make_shared<Hooks>();
  return add_hook(hooks_, &Hooks::post, std::move(hook), "register_forward_post_hook");
}

HookHandle Module::register_forward_wrapper(ForwardWrapper wrapper) {
  if (!hooks_) hooks_ = std::make_shared<Hooks>();
  return add_hook(hooks_, &Hooks::wrappers, std::move(wrapper), "register_forward_wrapper");
}

std::vector<Tensor> Module::call_forward(std::vector<Tensor> inputs, std::string key, const ForwardFn& forward) {
  if (!has_forward_hooks()) return forward(inputs);
  std::shared_ptr<Hooks> hooks = hooks_;  // copies: a hook may remove itself or add others
  ForwardCall call{std::move(inputs), std::move(key)};
  for (auto e : hooks->pre) e.fn(*this, call);
  // wrappers[0] is innermost: chain(i) runs wrapper i-1 around chain(i-1), chain(0) is the forward.
  const auto wrappers = hooks->wrappers;
  std::function<std::vector<Tensor>(size_t, const std::vector<Tensor>&)> chain =
      [&](size_t i, const std::vector<Tensor>& in) -> std::vector<Tensor> {
    if (i == 0) return forward(in);
    ForwardCall inner{in, call.key};
    return wrappers[i - 1].fn(*this, inner, [&chain, i](const std::vector<Tensor>& x) { return chain(i - 1, x); });
  };
  std::vector<Tensor> outputs = chain(wrappers.size(), call.inputs);
  for (auto e : hooks->post) e.fn(*this, call, outputs);
  return outputs;
}

}  // namespace kiln::nn

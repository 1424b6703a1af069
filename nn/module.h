// Module: the base of every layer (libtorch's names, no holder/pimpl: modules are plain classes
// owned by shared_ptr). A module registers its parameters, buffers and child modules by name;
// dotted names ("model.layers.0.mlp.up_proj.weight") come from the registration tree.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/hook_handle.h"
#include "core/tensor.h"

namespace kiln::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
using StateDict = std::map<std::string, Tensor>;

// What a non-strict load_state_dict left out: keys the module has but the dict lacks, and keys
// of the dict the module does not have.
struct LoadResult {
  std::vector<std::string> missing_keys;
  std::vector<std::string> unexpected_keys;
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The type's name for printing and errors ("Linear", "LlamaAttention").
  virtual std::string type_name() const { return "Module"; }

  // ---- registration (names may not contain '.'; a name is registered once)
  // Returns the stored handle; the tensor is shared, not copied. A parameter of a floating
  // dtype requires grad unless `requires_grad` is false.
  Tensor register_parameter(const std::string& name, Tensor t, bool requires_grad = true);
  // Buffers are state that is not trained (NF4 codes and scales). Non-persistent ones stay out of
  // state_dict(); non-castable ones keep their dtype when the module is cast (quantisation scales).
  Tensor register_buffer(const std::string& name, Tensor t, bool persistent = true, bool castable = true);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }
  // Swaps the child `name` (a direct child) for `module`; used to wrap layers (LoRA, NF4).
  void replace_module(const std::string& name, std::shared_ptr<Module> module);

  // ---- lookup
  Tensor parameter(const std::string& name) const;  // a direct parameter; error if absent
  Tensor buffer(const std::string& name) const;     // a direct buffer; error if absent
  bool has_parameter(const std::string& name) const;
  std::shared_ptr<Module> child(const std::string& name) const;  // a direct child; error if absent
  template <class M>
  M& child_as(const std::string& name) const {
    auto m = std::dynamic_pointer_cast<M>(child(name));
    if (!m) throw_wrong_child_type(name);
    return *m;
  }
  // A module anywhere below by dotted path ("model.layers.3.self_attn"); "" is this module.
  std::shared_ptr<Module> find_module(const std::string& path);

  // ---- traversal (registration order, depth first; names are dotted paths)
  NamedTensors named_parameters(bool recurse = true) const;
  std::vector<Tensor> parameters(bool recurse = true) const;
  NamedTensors named_trainable_parameters() const;  // those with requires_grad
  std::vector<Tensor> trainable_parameters() const;
  NamedTensors named_buffers(bool recurse = true) const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const;
  // Every module below, this one first under the name "" (shared_ptr of the children; this one is
  // returned as a non-owning pointer).
  std::vector<std::pair<std::string, Module*>> named_modules();
  int64_t num_parameters(bool trainable_only = false) const;

  // ---- forward hooks (what fully_shard and compile attach to)
  // Layers define operator() to run their forward through call_forward(): the pre hooks (registration
  // order; they may replace the tensor inputs), then the wrappers (the latest registered outermost;
  // each gets the call and the rest of the chain, and may run it, or not, or run something else), then
  // the post hooks (registration order; they may replace the outputs). `ForwardCall::key` spells the
  // non-tensor arguments ("start=0 cache=none") so a wrapper caching work per call can tell calls apart.
  // Hooks run again when a checkpointed block recomputes its forward in backward.
  struct ForwardCall {
    std::vector<Tensor> inputs;
    std::string key;
  };
  using ForwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& inputs)>;
  using ForwardPreHook = std::function<void(Module& module, ForwardCall& call)>;
  using ForwardPostHook = std::function<void(Module& module, const ForwardCall& call, std::vector<Tensor>& outputs)>;
  using ForwardWrapper =
      std::function<std::vector<Tensor>(Module& module, const ForwardCall& call, const ForwardFn& next)>;
  HookHandle register_forward_pre_hook(ForwardPreHook hook);
  HookHandle register_forward_post_hook(ForwardPostHook hook);
  HookHandle register_forward_wrapper(ForwardWrapper wrapper);
  bool has_forward_hooks() const;

  // Runs this module's forward through the JIT fuser from now on (compile/, which sits above nn and
  // installs itself with set_module_compiler): a Llama compiles each decoder layer, forward and
  // backward; any other module its whole forward. An error where kiln_compile is not linked.
  void compile();
  using ModuleCompiler = std::function<void(Module& module)>;
  static void set_module_compiler(ModuleCompiler compiler);
  struct Hooks;  // opaque: the hook lists

  // ---- state
  // Moves (and optionally casts the floating parameters and buffers of) every tensor in place:
  // handles held elsewhere (optimisers, submodules) see the new data. Gradients are dropped.
  // Layers may keep some tensors' dtype (LoRA adapters stay f32, NF4 scales stay f32).
  void to(Device device, std::optional<DType> dtype = std::nullopt) { apply_to(device, dtype); }
  void to(DType dtype) { apply_to(std::nullopt, dtype); }
  // What to() does: this module's tensors, then each child's apply_to. Overridden by layers whose
  // tensors keep their dtype.
  virtual void apply_to(std::optional<Device> device, std::optional<DType> dtype);
  void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  void requires_grad_(bool requires_grad);  // every parameter below
  void zero_grad();

  // Parameters and persistent buffers by dotted name (the tensors themselves, not copies).
  StateDict state_dict() const;
  // Copies each value into the matching tensor (converting dtype and device). Every shape is
  // checked before anything is copied, so a failing load changes nothing. strict: missing or
  // unexpected keys are an error naming them; non-strict: they are returned.
  LoadResult load_state_dict(const StateDict& state, bool strict = true);

 protected:
  // Called by train(); layers with training-dependent state override it.
  virtual void on_train(bool) {}
  // Runs `forward` on `inputs` through the hooks (see above); `key` names the non-tensor arguments.
  std::vector<Tensor> call_forward(std::vector<Tensor> inputs, std::string key, const ForwardFn& forward);
  // One tensor in, one out: operator() of Linear-like layers, norms, MLPs.
  template <class F>
  Tensor call_forward1(const Tensor& x, F&& forward) {
    if (!has_forward_hooks()) return forward(x);
    return call_forward({x}, {}, [&forward](const std::vector<Tensor>& in) { return std::vector<Tensor>{forward(in.at(0))}; })
        .at(0);
  }

 private:
  struct Slot {
    std::string name;
    Tensor tensor;
    bool persistent = true;
    bool castable = true;
  };
  void add_child(const std::string& name, std::shared_ptr<Module> module);
  void check_new_name(const std::string& name) const;
  [[noreturn]] void throw_wrong_child_type(const std::string& name) const;
  void collect_parameters(const std::string& prefix, bool recurse, NamedTensors& out) const;
  void collect_buffers(const std::string& prefix, bool recurse, bool persistent_only, NamedTensors& out) const;

  std::vector<Slot> parameters_;
  std::vector<Slot> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
  std::shared_ptr<Hooks> hooks_;  // shared with the removal handles (weakly)
};

// A list of modules named "0", "1", ... (Llama's `layers`).
class ModuleList : public Module {
 public:
  std::string type_name() const override { return "ModuleList"; }
  template <class M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> module) {
    return register_module(std::to_string(size_++), std::move(module));
  }
  int64_t size() const { return size_; }
  template <class M>
  M& at(int64_t i) const {
    return child_as<M>(std::to_string(i));
  }

 private:
  int64_t size_ = 0;
};

// Points `target`'s impl at `value`'s data (storage, offset, shape, strides, dtype, device), keeping its
// identity, requires_grad and gradient (fully_shard swaps parameters between shard and full views so).
void point_at(const Tensor& target, const Tensor& value);
// point_at, and drops the gradient: used by Module::to and by loaders.
void assign_data(const Tensor& target, const Tensor& value);

}  // namespace kiln::nn

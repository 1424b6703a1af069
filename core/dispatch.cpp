// The dispatch point: kernel registry, handler stack, observers, and the path every op takes.
#include "core/dispatch.h"

#include <array>
#include <unordered_map>

#include "core/grad_recorder.h"
#include "core/registry.h"

namespace kiln {
namespace {

struct Registry {
  std::unordered_map<std::type_index, std::array<Kernel, kNumDeviceTypes>> kernels;
};

Registry& registry() {
  static Registry r;
  return r;
}

const Kernel& find_kernel(const Primitive& op, DeviceType device) {
  run_registrations();
  auto it = registry().kernels.find(std::type_index(typeid(op)));
  static const Kernel none;
  if (it == registry().kernels.end()) return none;
  return it->second[static_cast<int>(device)];
}

thread_local std::vector<DispatchObserver*> t_observers;
thread_local std::vector<DispatchHandler*> t_handlers;
// How many handlers (from the bottom of the stack) an op dispatched now passes through: all of them,
// except while a handler runs, when only those below it.
thread_local size_t t_active = 0;

void notify(const Primitive& op, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs) {
  for (DispatchObserver* o : t_observers) o->on_op(op, inputs, outputs);
}

// All inputs defined and on one device.
void check_inputs(const Primitive& op, const std::vector<Tensor>& inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    KILN_CHECK(inputs[i].defined(), op.name(), "input {} is an undefined tensor", i);
    KILN_CHECK(inputs[i].device() == inputs[0].device(), op.name(),
               "expected all tensors on one device, found {} (input 0) and {} (input {})",
               inputs[0].device().str(), inputs[i].device().str(), i);
  }
}

void run_kernel(const Primitive& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs, Device device) {
  const Kernel& k = find_kernel(op, device.type);
  KILN_CHECK(static_cast<bool>(k), op.name(), "no kernel for device {}{}", device.str(),
             device.is_cuda() ? " (was kiln built with CUDA?)" : "");
  k(op, inputs, outputs);
}

// The bottom of the stack: a view aliases its input; any other op allocates its outputs and runs its kernel.
std::vector<Tensor> run_kernels(const PrimitivePtr& op, const std::vector<Tensor>& inputs) {
  std::vector<Tensor> outputs;
  if (op->is_view()) {
    outputs.push_back(op->make_view(inputs));
    return outputs;
  }
  std::vector<TensorMeta> metas = op->infer(inputs);
  outputs.reserve(metas.size());
  for (const TensorMeta& m : metas) outputs.push_back(empty(m.shape, m.dtype, m.device));
  if (!metas.empty()) run_kernel(*op, inputs, outputs, op->kernel_device(inputs, metas));
  return outputs;
}

void run_kernels_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  std::vector<TensorMeta> metas = op->infer(inputs);
  if (!metas.empty()) run_kernel(*op, inputs, outputs, op->kernel_device(inputs, metas));
}

// Runs handler `level - 1` with only the handlers below it active, restoring the stack position after.
template <class Fn>
auto with_handler(size_t level, Fn&& fn) {
  const size_t saved = t_active;
  t_active = level - 1;
  struct Restore {
    size_t v;
    ~Restore() { t_active = v; }
  } restore{saved};
  return fn(t_handlers[level - 1]);
}

std::vector<Tensor> run_from(size_t level, const PrimitivePtr& op, const std::vector<Tensor>& inputs) {
  if (level == 0) return run_kernels(op, inputs);
  return with_handler(level, [&](DispatchHandler* h) { return h->run(op, inputs); });
}

void run_from_into(size_t level, const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  if (level == 0) return run_kernels_into(op, inputs, outputs);
  with_handler(level, [&](DispatchHandler* h) { h->run_into(op, inputs, outputs); return 0; });
}

}  // namespace

void register_kernel(std::type_index primitive, DeviceType device, Kernel kernel) {
  registry().kernels[primitive][static_cast<int>(device)] = std::move(kernel);
}

bool has_kernel(const Primitive& op, DeviceType device) { return static_cast<bool>(find_kernel(op, device)); }

std::vector<Tensor> DispatchHandler::run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) {
  return dispatch_next(op, inputs);
}
void DispatchHandler::run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  dispatch_next_into(op, inputs, outputs);
}

std::vector<Tensor> dispatch_next(const PrimitivePtr& op, const std::vector<Tensor>& inputs) {
  return run_from(t_active, op, inputs);
}
void dispatch_next_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  run_from_into(t_active, op, inputs, outputs);
}

std::vector<Tensor> dispatch(PrimitivePtr op, const std::vector<Tensor>& inputs) {
  run_registrations();
  check_inputs(*op, inputs);
  std::vector<Tensor> outputs = run_from(t_active, op, inputs);
  KILN_CHECK(t_active == 0 || op->is_view() || outputs.size() == op->infer(inputs).size(), op->name(),
             "a dispatch handler returned {} outputs", outputs.size());
  if (op->differentiable() && grad_recording()) {
    bool any = false;
    for (const Tensor& t : inputs) any = any || t.requires_grad();
    if (any) grad_recorder()->record(op, inputs, outputs);
  }
  notify(*op, inputs, outputs);
  return outputs;
}

Tensor dispatch1(PrimitivePtr op, const std::vector<Tensor>& inputs) { return dispatch(std::move(op), inputs)[0]; }

void dispatch_into(PrimitivePtr op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  run_registrations();
  check_inputs(*op, inputs);
  std::vector<TensorMeta> metas = op->infer(inputs);
  KILN_CHECK(metas.size() == outputs.size(), op->name(), "expected {} outputs, given {}", metas.size(), outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const Tensor& o = outputs[i];
    KILN_CHECK(o.defined(), op->name(), "output {} is an undefined tensor", i);
    KILN_CHECK(o.shape() == metas[i].shape && o.dtype() == metas[i].dtype && o.device() == metas[i].device, op->name(),
               "output {} is {} {} on {}, expected {} {} on {}", i, shape_str(o.shape()), dtype_name(o.dtype()),
               o.device().str(), shape_str(metas[i].shape), dtype_name(metas[i].dtype), metas[i].device.str());
    KILN_CHECK(!(grad_recording() && o.requires_grad()), op->name(),
               "in-place write to a tensor that requires grad; wrap it in autograd::NoGradGuard");
  }
  run_from_into(t_active, op, inputs, outputs);
  for (const Tensor& o : outputs) {
    if (o.storage()) o.storage()->bump_version();
  }
  notify(*op, inputs, outputs);
}

HandlerScope::HandlerScope(DispatchHandler* handler) : handler_(handler) {
  KILN_CHECK(t_active == t_handlers.size(), "dispatch", "a handler cannot be pushed while another handler runs");
  t_handlers.push_back(handler);
  t_active = t_handlers.size();
}
HandlerScope::~HandlerScope() {
  if (!t_handlers.empty() && t_handlers.back() == handler_) t_handlers.pop_back();
  t_active = t_handlers.size();
}

ObserverScope::ObserverScope(DispatchObserver* observer) : observer_(observer) { t_observers.push_back(observer); }
ObserverScope::~ObserverScope() {
  for (size_t i = t_observers.size(); i-- > 0;) {
    if (t_observers[i] == observer_) { t_observers.erase(t_observers.begin() + static_cast<long>(i)); break; }
  }
}

// ---- the autograd recorder slot (core/grad_recorder.h)
namespace {
GradRecorder*& recorder_slot() {
  static GradRecorder* r = nullptr;
  return r;
}
}  // namespace
void set_grad_recorder(GradRecorder* recorder) { recorder_slot() = recorder; }
GradRecorder* grad_recorder() {
  run_registrations();
  return recorder_slot();
}
bool grad_recording() {
  GradRecorder* r = grad_recorder();
  return r != nullptr && r->enabled();
}

Tensor Primitive::make_view(const std::vector<Tensor>&) const { KILN_FAIL(name(), "is not a view"); }

std::vector<Tensor> Primitive::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                                   const std::vector<bool>&) const {
  KILN_FAIL(name(), "is not differentiable");
}

}  // namespace kiln

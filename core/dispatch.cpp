// The dispatch point: kernel registry, observers, and the path every op takes.
#include "core/dispatch.h"

#include <array>
#include <mutex>
#include <unordered_map>

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "core/cpu/register.h"
#if KILN_WITH_CUDA
#include "core/cuda/register.h"
#endif

namespace kiln {
namespace {

struct Registry {
  std::unordered_map<std::type_index, std::array<Kernel, kNumDeviceTypes>> kernels;
};

Registry& registry() {
  static Registry r;
  return r;
}

void ensure_registered() {
  static std::once_flag once;
  std::call_once(once, [] {
    cpu::register_kernels();
#if KILN_WITH_CUDA
    cuda::register_kernels();
#endif
  });
}

const Kernel& find_kernel(const Primitive& op, DeviceType device) {
  ensure_registered();
  auto it = registry().kernels.find(std::type_index(typeid(op)));
  static const Kernel none;
  if (it == registry().kernels.end()) return none;
  return it->second[static_cast<int>(device)];
}

thread_local std::vector<DispatchObserver*> t_observers;

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

}  // namespace

void register_kernel(std::type_index primitive, DeviceType device, Kernel kernel) {
  registry().kernels[primitive][static_cast<int>(device)] = std::move(kernel);
}

bool has_kernel(const Primitive& op, DeviceType device) { return static_cast<bool>(find_kernel(op, device)); }

std::vector<Tensor> dispatch(PrimitivePtr op, const std::vector<Tensor>& inputs) {
  check_inputs(*op, inputs);
  std::vector<Tensor> outputs;
  if (op->is_view()) {
    outputs.push_back(op->make_view(inputs));
  } else {
    std::vector<TensorMeta> metas = op->infer(inputs);
    outputs.reserve(metas.size());
    for (const TensorMeta& m : metas) outputs.push_back(empty(m.shape, m.dtype, m.device));
    if (!metas.empty()) run_kernel(*op, inputs, outputs, op->kernel_device(inputs, metas));
  }
  if (autograd::grad_enabled() && op->differentiable()) {
    bool any = false;
    for (const Tensor& t : inputs) any = any || t.requires_grad();
    if (any) autograd::record(op, inputs, outputs);
  }
  notify(*op, inputs, outputs);
  return outputs;
}

Tensor dispatch1(PrimitivePtr op, const std::vector<Tensor>& inputs) { return dispatch(std::move(op), inputs)[0]; }

void dispatch_into(PrimitivePtr op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) {
  check_inputs(*op, inputs);
  std::vector<TensorMeta> metas = op->infer(inputs);
  KILN_CHECK(metas.size() == outputs.size(), op->name(), "expected {} outputs, given {}", metas.size(), outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const Tensor& o = outputs[i];
    KILN_CHECK(o.defined(), op->name(), "output {} is an undefined tensor", i);
    KILN_CHECK(o.shape() == metas[i].shape && o.dtype() == metas[i].dtype && o.device() == metas[i].device, op->name(),
               "output {} is {} {} on {}, expected {} {} on {}", i, shape_str(o.shape()), dtype_name(o.dtype()),
               o.device().str(), shape_str(metas[i].shape), dtype_name(metas[i].dtype), metas[i].device.str());
    KILN_CHECK(!(autograd::grad_enabled() && o.requires_grad()), op->name(),
               "in-place write to a tensor that requires grad; wrap it in autograd::NoGradGuard");
  }
  if (!metas.empty()) run_kernel(*op, inputs, outputs, op->kernel_device(inputs, metas));
  for (const Tensor& o : outputs) o.storage()->bump_version();
  notify(*op, inputs, outputs);
}

ObserverScope::ObserverScope(DispatchObserver* observer) : observer_(observer) { t_observers.push_back(observer); }
ObserverScope::~ObserverScope() {
  for (size_t i = t_observers.size(); i-- > 0;) {
    if (t_observers[i] == observer_) { t_observers.erase(t_observers.begin() + static_cast<long>(i)); break; }
  }
}

Tensor Primitive::make_view(const std::vector<Tensor>&) const { KILN_FAIL(name(), "is not a view"); }

std::vector<Tensor> Primitive::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                                   const std::vector<bool>&) const {
  KILN_FAIL(name(), "is not differentiable");
}

}  // namespace kiln

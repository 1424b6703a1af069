// The one dispatch point every op passes through: checks devices, asks the primitive for output
// shapes, allocates outputs, runs the kernel registered for (primitive, device type), tells the
// observers (profiler, tracer, tests) and records the autograd node. Nothing calls a kernel around it.
#pragma once
#include <functional>
#include <typeindex>
#include <vector>

#include "core/primitive.h"

namespace kiln {

using Kernel = std::function<void(const Primitive&, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs)>;

// Runs `op` on `inputs`; `device` places ops that have no tensor inputs (creation ops).
std::vector<Tensor> dispatch(PrimitivePtr op, const std::vector<Tensor>& inputs);
Tensor dispatch1(PrimitivePtr op, const std::vector<Tensor>& inputs);
// Runs `op` writing into existing `outputs` (in-place ops: copy_, fill_); no autograd is recorded and
// writing into a tensor that requires grad while grad mode is on is an error.
void dispatch_into(PrimitivePtr op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs);

void register_kernel(std::type_index primitive, DeviceType device, Kernel kernel);
template <class P>
void register_kernel(DeviceType device, void (*fn)(const P&, const std::vector<Tensor>&, std::vector<Tensor>&)) {
  register_kernel(std::type_index(typeid(P)), device,
                  [fn](const Primitive& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
                    fn(static_cast<const P&>(p), in, out);
                  });
}
bool has_kernel(const Primitive& op, DeviceType device);

// Observers see every op after it ran (views included). They nest: the latest added is called last.
class DispatchObserver {
 public:
  virtual ~DispatchObserver() = default;
  virtual void on_op(const Primitive& op, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs) = 0;
};
// RAII registration on the calling thread.
class ObserverScope {
 public:
  explicit ObserverScope(DispatchObserver* observer);
  ~ObserverScope();
  ObserverScope(const ObserverScope&) = delete;
  ObserverScope& operator=(const ObserverScope&) = delete;

 private:
  DispatchObserver* observer_;
};

}  // namespace kiln

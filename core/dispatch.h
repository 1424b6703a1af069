// The one dispatch point every op passes through: checks devices, offers the op to the handler stack
// (a tracer or a compiled plan may take it over before any kernel runs), else asks the primitive for
// output shapes, allocates outputs and runs the kernel registered for (primitive, device type); then
// records the autograd node (through the recorder autograd installs) and tells the observers.
// Nothing calls a kernel around it.
#pragma once
#include <functional>
#include <typeindex>
#include <vector>

#include "core/primitive.h"

namespace kiln {

using Kernel = std::function<void(const Primitive&, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs)>;

// Runs `op` on `inputs` (ops without inputs place their outputs from the primitive's infer()).
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

// Handlers intercept ops before any kernel runs. They stack per thread; the latest pushed sees an op
// first and either makes the outputs itself (a tracer hands out tensors without data, a compiled
// plan runs its own kernels) or passes the op on with dispatch_next(). While a handler runs, ops it
// dispatches itself see only the handlers below it. Autograd recording and observers come after the
// handlers, for every op, whoever ran it.
class DispatchHandler {
 public:
  virtual ~DispatchHandler() = default;
  // An out-of-place op or a view: returns its outputs.
  virtual std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs);
  // An in-place op (copy_, fill_) writing into `outputs`, already checked against infer().
  virtual void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs);
};
// What the handler below the running one (or, at the bottom, the kernels) does with the op.
std::vector<Tensor> dispatch_next(const PrimitivePtr& op, const std::vector<Tensor>& inputs);
void dispatch_next_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs);
// RAII: pushes `handler` on this thread's stack; scopes must end in reverse order of creation.
class HandlerScope {
 public:
  explicit HandlerScope(DispatchHandler* handler);
  ~HandlerScope();
  HandlerScope(const HandlerScope&) = delete;
  HandlerScope& operator=(const HandlerScope&) = delete;

 private:
  DispatchHandler* handler_;
};

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

// Optimisers over named parameters, as torch.optim: the Optimizer base (zero_grad, lr, state dicts,
// save/load of one safetensors file keyed by parameter name), AdamW (fused multi-tensor kernel,
// f32 state) and SGD (momentum, dampening, nesterov, weight decay), and clip_grad_norm_.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "nn/module.h"  // NamedTensors

namespace kiln::nn {

// Everything an optimizer needs to resume: its type, the number of step() calls, the
// hyperparameters and, per parameter that has state, tensors keyed "<param name>.<key>" (AdamW:
// exp_avg, exp_avg_sq, step; SGD with momentum: momentum_buffer, step). `params` lists every
// parameter name the optimizer holds, in order.
struct OptimizerState {
  std::string type;
  int64_t step = 0;
  std::map<std::string, double> hyper;
  std::vector<std::string> params;
  std::map<std::string, Tensor> tensors;
};

class Optimizer {
 public:
  // Parameter names must be unique and non-empty; tensors must be floating point.
  Optimizer(NamedTensors params, double lr);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  virtual const char* type() const = 0;
  // One update of every parameter that has a grad (others are skipped and keep their state).
  virtual void step() = 0;
  // Drops every grad (torch's set_to_none=True).
  void zero_grad();
  double lr() const { return lr_; }
  void set_lr(double lr);
  int64_t step_count() const { return step_; }
  const NamedTensors& parameters() const { return params_; }
  // State tensors of parameter `name` (empty before its first update).
  const std::map<std::string, Tensor>& state(const std::string& name) const;
  // Bytes the first updates of the parameters without state will allocate (f32 state tensors of
  // each parameter's shape: AdamW 8 bytes per element, SGD with momentum 4, without 0).
  size_t pending_state_bytes() const;

  OptimizerState state_dict() const;  // tensors are the live state (not copies)
  // Replaces the state with copies of `s` on the parameters' devices. Throws kiln::Error "[optim] ..."
  // naming the parameter or key at fault (wrong type, missing/extra names, shapes, dtypes,
  // hyperparameters); on error the optimizer is unchanged.
  void load_state_dict(const OptimizerState& s);
  // One safetensors file: the state tensors plus metadata (format, type, step, hyperparameters as
  // JSON, parameter names as JSON).
  void save(const std::string& path) const;
  void load(const std::string& path);

 protected:
  virtual std::map<std::string, double> hyperparameters() const = 0;  // lr included
  // Validates a complete set (throws kiln::Error) and applies it.
  virtual void set_hyperparameters(const std::map<std::string, double>& h) = 0;
  // The state tensor keys (besides "step") a parameter with state has.
  virtual std::vector<std::string> state_keys() const = 0;
  void load_tensors(const OptimizerState& s, const std::map<std::string, size_t>& index,
                    std::vector<std::map<std::string, Tensor>>& state, std::vector<int64_t>& steps) const;

  NamedTensors params_;
  std::vector<std::map<std::string, Tensor>> state_;  // per parameter; f32, contiguous, on its device
  std::vector<int64_t> param_steps_;                  // per parameter: updates it has received
  int64_t step_ = 0;
  double lr_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// torch.optim.AdamW (amsgrad=False, maximize=False). Params may be f32, bf16 or f16 (updated in f32,
// rounded once); state is f32. One fused adamw_step_ call (one CUDA launch) per device and dtype.
class AdamW final : public Optimizer {
 public:
  explicit AdamW(NamedTensors params, AdamWOptions options = {});
  const char* type() const override { return "AdamW"; }
  void step() override;
  AdamWOptions options() const;

 protected:
  std::map<std::string, double> hyperparameters() const override;
  void set_hyperparameters(const std::map<std::string, double>& h) override;
  std::vector<std::string> state_keys() const override { return {"exp_avg", "exp_avg_sq"}; }

 private:
  AdamWOptions o_;
};

struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  double weight_decay = 0.0;
};

// torch.optim.SGD (maximize=False): d = g + wd p; with momentum, buf = d on the first update, then
// buf = momentum buf + (1 - dampening) d, and d = nesterov ? d + momentum buf : buf; p -= lr d.
// Computed in f32 with kiln ops; the momentum buffer is f32.
class SGD final : public Optimizer {
 public:
  explicit SGD(NamedTensors params, SGDOptions options = {});
  const char* type() const override { return "SGD"; }
  void step() override;
  SGDOptions options() const;

 protected:
  std::map<std::string, double> hyperparameters() const override;
  void set_hyperparameters(const std::map<std::string, double>& h) override;
  std::vector<std::string> state_keys() const override;

 private:
  SGDOptions o_;
};

// torch.nn.utils.clip_grad_norm_ (norm_type 2): the L2 norm over all grads (one fused
// multi_tensor_l2_norm launch and one host read per device); when above max_norm, grads are
// scaled in place by max_norm / (norm + 1e-6) (one fused multi_tensor_scale_ per device). A
// non-finite norm is returned and the grads are left untouched. Params without a grad are
// ignored. Returns the norm.
double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm);
double clip_grad_norm_(const NamedTensors& params, double max_norm);

}  // namespace kiln::nn

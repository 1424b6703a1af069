// The AdamWStep primitive (shape/dtype rules, per-tensor bias corrections) and adamw_step_, which
// validates a whole multi-tensor update and writes it in place through dispatch_into; the
// multi-tensor L2 norm and scale primitives and their entry points.
#include "core/ops/optim.h"

#include <cmath>

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {
namespace prim {

std::vector<TensorMeta> AdamWStep::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == steps_.size(), "adamw_step", "{} grads for {} steps", in.size(), steps_.size());
  std::vector<TensorMeta> metas(3 * in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const Tensor& g = in[i];
    KILN_CHECK(g.dtype() == in[0].dtype(), "adamw_step", "grads must share one dtype: grad 0 is {}, grad {} is {}",
               dtype_name(in[0].dtype()), i, dtype_name(g.dtype()));
    KILN_CHECK(g.dtype() == DType::f32 || g.dtype() == DType::bf16 || g.dtype() == DType::f16, "adamw_step",
               "parameters must be f32, bf16 or f16, grad {} is {}", i, dtype_name(g.dtype()));
    KILN_CHECK(steps_[i] >= 1, "adamw_step", "step of tensor {} must be >= 1, got {}", i, steps_[i]);
    metas[i] = {g.shape(), g.dtype(), g.device()};
    metas[in.size() + i] = {g.shape(), DType::f32, g.device()};
    metas[2 * in.size() + i] = {g.shape(), DType::f32, g.device()};
  }
  return metas;
}

float AdamWStep::decay() const { return static_cast<float>(1.0 - hyper_.lr * hyper_.weight_decay); }
float AdamWStep::step_size(size_t i) const {
  return static_cast<float>(hyper_.lr / (1.0 - std::pow(hyper_.beta1, static_cast<double>(steps_.at(i)))));
}
float AdamWStep::bias_correction2_sqrt(size_t i) const {
  return static_cast<float>(std::sqrt(1.0 - std::pow(hyper_.beta2, static_cast<double>(steps_.at(i)))));
}

namespace {
void check_multi_tensor_dtypes(const std::vector<Tensor>& in, const char* op) {
  KILN_CHECK(!in.empty(), op, "needs at least one tensor");
  for (size_t i = 0; i < in.size(); ++i) {
    const DType d = in[i].dtype();
    KILN_CHECK(d == DType::f32 || d == DType::bf16 || d == DType::f16, op,
               "tensors must be f32, bf16 or f16, tensor {} is {}", i, dtype_name(d));
  }
}
}  // namespace

std::vector<TensorMeta> MultiTensorL2Norm::infer(const std::vector<Tensor>& in) const {
  check_multi_tensor_dtypes(in, name());
  return {{Shape{}, DType::f32, in[0].device()}};
}


std::vector<TensorMeta> MultiTensorScale::infer(const std::vector<Tensor>& in) const {
  check_multi_tensor_dtypes(in, name());
  std::vector<TensorMeta> metas(in.size());
  for (size_t i = 0; i < in.size(); ++i) metas[i] = {in[i].shape(), in[i].dtype(), in[i].device()};
  return metas;
}

}  // namespace prim

void adamw_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                 const std::vector<int64_t>& steps, const AdamWHyper& h) {
  const size_t n = params.size();
  KILN_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n, "adamw_step",
             "list lengths differ: {} params, {} grads, {} exp_avgs, {} exp_avg_sqs, {} steps", n, grads.size(),
             exp_avgs.size(), exp_avg_sqs.size(), steps.size());
  KILN_CHECK(h.lr >= 0.0 && h.eps >= 0.0 && h.weight_decay >= 0.0, "adamw_step",
             "lr, eps and weight_decay must be >= 0, got {}, {}, {}", h.lr, h.eps, h.weight_decay);
  KILN_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0 && h.beta2 >= 0.0 && h.beta2 < 1.0, "adamw_step",
             "betas must be in [0, 1), got ({}, {})", h.beta1, h.beta2);
  if (n == 0) return;
  std::vector<Tensor> in(n), out(3 * n);
  for (size_t i = 0; i < n; ++i) {
    KILN_CHECK(params[i].defined() && grads[i].defined() && exp_avgs[i].defined() && exp_avg_sqs[i].defined(),
               "adamw_step", "tensor {} has an undefined param, grad or state", i);
    KILN_CHECK(params[i].is_contiguous() && exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous(),
               "adamw_step", "param and state of tensor {} must be contiguous", i);
    KILN_CHECK(grads[i].shape() == params[i].shape(), "adamw_step", "grad {} has shape {}, its param {}", i,
               shape_str(grads[i].shape()), shape_str(params[i].shape()));
    in[i] = contiguous(grads[i]);
    out[i] = params[i];
    out[n + i] = exp_avgs[i];
    out[2 * n + i] = exp_avg_sqs[i];
  }
  dispatch_into(std::make_shared<const prim::AdamWStep>(h, steps), in, out);
}

Tensor multi_tensor_l2_norm(const std::vector<Tensor>& tensors) {
  std::vector<Tensor> in(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    KILN_CHECK(tensors[i].defined(), "multi_tensor_l2_norm", "tensor {} is undefined", i);
    in[i] = contiguous(tensors[i]);
  }
  return dispatch1(std::make_shared<const prim::MultiTensorL2Norm>(), in);
}

void multi_tensor_scale_(const std::vector<Tensor>& tensors, double scale) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    KILN_CHECK(tensors[i].defined(), "multi_tensor_scale", "tensor {} is undefined", i);
    KILN_CHECK(tensors[i].is_contiguous() || tensors[i].numel() == 0, "multi_tensor_scale",
               "tensor {} must be contiguous", i);
  }
  if (tensors.empty()) return;
  std::vector<Tensor> out = tensors;
  dispatch_into(std::make_shared<const prim::MultiTensorScale>(static_cast<float>(scale)), tensors, out);
}

}  // namespace kiln

// NF4Linear and the in-place quantisation of a module's linear layers.
#include "nn/nf4_linear.h"

#include "autograd/grad_mode.h"

namespace kiln::nn {

NF4Linear::NF4Linear(quant::NF4Weight weight, Tensor bias)
    : LinearBase(weight.shape.size() == 2 ? weight.shape[1] : 0, weight.shape.size() == 2 ? weight.shape[0] : 0),
      weight_(std::move(weight)) {
  KILN_CHECK(weight_.shape.size() == 2, "NF4Linear", "expected a 2-d (out, in) weight, found {}", shape_str(weight_.shape));
  weight_.validate("NF4Linear");
  // The scales keep their dtype (f32) whatever dtype the model is cast to.
  register_buffer("weight", weight_.packed, true, /*castable=*/false);
  register_buffer("weight_absmax", weight_.absmax, true, false);
  if (weight_.double_quant) {
    register_buffer("weight_nested_absmax", weight_.nested_absmax, true, false);
    register_buffer("weight_nested_code", weight_.nested_code, true, false);
  }
  if (bias.defined()) {
    KILN_CHECK(bias.shape() == Shape{out_features_}, "NF4Linear", "expected bias ({}), found {}", out_features_,
               shape_str(bias.shape()));
    register_parameter("bias", bias, false);
  }
}

std::shared_ptr<NF4Linear> NF4Linear::from_linear(const Linear& linear, bool double_quant) {
  autograd::NoGradGuard no_grad;
  const Tensor b = linear.bias();
  return std::make_shared<NF4Linear>(quant::quantize_nf4(linear.weight().detach(), double_quant),
                                     b.defined() ? b.detach() : Tensor());
}

Tensor NF4Linear::forward(const Tensor& x) { return run(x, Tensor()); }

Tensor NF4Linear::forward_add(const Tensor& x, const Tensor& residual) {
  if (!gemm_addend_fits(residual, x, out_features_)) return LinearBase::forward_add(x, residual);
  return run(x, residual);
}

Tensor NF4Linear::run(const Tensor& x, const Tensor& residual) {
  KILN_CHECK(x.dim() >= 1 && x.shape().back() == in_features_, "NF4Linear", "expected input (..., {}), found {}",
             in_features_, shape_str(x.shape()));
  Tensor b = has_parameter("bias") ? parameter("bias") : Tensor();
  if (b.defined() && b.dtype() != x.dtype()) b = cast(b, x.dtype());
  // A tracer's input (compile/: no storage) gets the plain op, so no compiled graph holds the kept weight.
  if (!keep_dense_ || !x.storage() || x.device() != weight_.device())
    return quant::nf4_linear(x, weight_, b, Tensor(), residual);
  // What the kept weight was built from: each NF4 tensor's data and version (writes bump it).
  std::vector<std::pair<const void*, uint64_t>> of;
  for (const Tensor* t : {&weight_.packed, &weight_.absmax, &weight_.nested_absmax})
    if (t->defined()) of.emplace_back(t->raw_data(), t->storage() ? t->storage()->version() : 0);
  if (!dense_.defined() || dense_.dtype() != x.dtype() || of != dense_of_) {
    dense_ = Tensor();  // the old one goes before the new one is made
    autograd::NoGradGuard no_grad;
    dense_ = quant::dequantize_nf4(weight_, x.dtype());  // (out, in)
    dense_of_ = std::move(of);
  }
  return quant::nf4_linear(x, weight_, b, dense_, residual);
}

void NF4Linear::keep_dequantized(bool on) {
  keep_dense_ = on;
  if (!on) {
    dense_ = Tensor();
    dense_of_.clear();
  }
}

Tensor NF4Linear::dequantized_weight(DType dtype) const { return quant::dequantize_nf4(weight_, dtype); }

int64_t quantize_linears_nf4(Module& root, bool double_quant) {
  // Collect first: named_modules() holds raw pointers, and replacing a Linear frees it.
  std::vector<std::pair<Module*, std::string>> targets;  // (parent, child name)
  for (auto& [path, m] : root.named_modules()) {
    for (auto& [name, child] : m->named_children()) {
      if (std::dynamic_pointer_cast<Linear>(child)) targets.emplace_back(m, name);
    }
  }
  for (auto& [parent, name] : targets) {
    auto lin = std::dynamic_pointer_cast<Linear>(parent->child(name));
    parent->replace_module(name, NF4Linear::from_linear(*lin, double_quant));
  }
  return static_cast<int64_t>(targets.size());
}

}  // namespace kiln::nn

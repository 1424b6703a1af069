// Merging LoRA adapters and dequantising NF4 weights into plain Linear weights, and the plain (or
// bnb-4bit) checkpoint of a whole model computed tensor by tensor.
#include "nn/merge.h"

#include <algorithm>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "quant/bnb_checkpoint.h"

namespace kiln::nn {

namespace {

// A layer whose weights are not a plain Linear's: these are exported through plain_weight().
bool needs_merging(const Module& m) { return dynamic_cast<const LoraLinear*>(&m) || dynamic_cast<const NF4Linear*>(&m); }

Tensor cast_floating(const Tensor& t, DType dtype) { return is_floating(t.dtype()) ? cast(t, dtype) : t; }

}  // namespace

Tensor plain_weight(const LinearBase& layer, DType dtype) {
  KILN_CHECK(is_floating(dtype), "merge", "a plain weight needs a floating dtype, found {}", dtype_name(dtype));
  autograd::NoGradGuard no_grad;
  if (const auto* lin = dynamic_cast<const Linear*>(&layer)) return cast(lin->weight().detach(), dtype);
  if (const auto* nf4 = dynamic_cast<const NF4Linear*>(&layer)) return nf4->dequantized_weight(dtype);
  const auto* lora = dynamic_cast<const LoraLinear*>(&layer);
  KILN_CHECK(lora != nullptr, "merge", "cannot make a plain weight of a {} (Linear, NF4Linear or LoraLinear)",
             layer.type_name());
  const LinearBase& base = lora->base();
  if (lora->merged()) return plain_weight(base, dtype);  // the adapter is in the base weight already
  DType acc = DType::f32;
  if (const auto* lin = dynamic_cast<const Linear*>(&base); lin && lin->weight().dtype() == DType::f64) acc = DType::f64;
  const Tensor w = plain_weight(base, acc);                                                        // (out, in)
  const Tensor delta = matmul(cast(lora->lora_b(), acc), cast(lora->lora_a(), acc));              // (out, r) @ (r, in)
  KILN_CHECK(delta.shape() == w.shape(), "merge", "the adapter's B @ A has shape {}, the base weight {}",
             shape_str(delta.shape()), shape_str(w.shape()));
  return cast(add(w, mul(delta, lora->scaling())), dtype);  // one rounding, into dtype
}

Tensor plain_bias(const LinearBase& layer, DType dtype) {
  const auto* lora = dynamic_cast<const LoraLinear*>(&layer);
  const LinearBase& base = lora ? lora->base() : layer;
  if (!base.has_parameter("bias")) return Tensor();
  autograd::NoGradGuard no_grad;
  return cast(base.parameter("bias").detach(), dtype);
}

int64_t merge_and_unload(Module& root, DType dtype) {
  // Collect first: replacing a layer frees it, and named_modules() holds raw pointers.
  std::vector<std::pair<Module*, std::string>> targets;  // (parent, child name), outermost layers only
  std::vector<std::string> done;
  for (auto& [path, m] : root.named_modules()) {
    bool inside = false;
    for (const std::string& d : done) inside = inside || path == d || path.starts_with(d + ".");
    if (inside) continue;
    for (auto& [name, child] : m->named_children()) {
      if (!needs_merging(*child)) continue;
      targets.emplace_back(m, name);
      done.push_back(path.empty() ? name : path + "." + name);
    }
  }
  for (auto& [parent, name] : targets) {
    const auto& layer = parent->child_as<LinearBase>(name);
    const Tensor w = plain_weight(layer, dtype);  // (out, in)
    const Tensor b = plain_bias(layer, dtype);    // (out) or undefined
    auto lin = std::make_shared<Linear>(layer.in_features(), layer.out_features(), b.defined(), dtype, w.device(),
                                        Init{Init::Kind::uninitialized, 0.0, nullptr});
    StateDict state{{"weight", w}};
    if (b.defined()) state.emplace("bias", b);
    lin->load_state_dict(state);
    lin->requires_grad_(false);
    parent->replace_module(name, lin);
  }
  return static_cast<int64_t>(targets.size());
}

std::vector<PlainTensor> plain_tensors(Module& root, bool nf4_as_bnb) {
  std::vector<std::pair<std::string, LinearBase*>> layers;  // outermost LoraLinear/NF4Linear layers by path
  for (auto& [path, m] : root.named_modules()) {
    bool inside = false;
    for (const auto& [p, l] : layers) inside = inside || path.starts_with(p + ".");
    if (!inside && needs_merging(*m)) layers.emplace_back(path, dynamic_cast<LinearBase*>(m));
  }
  std::vector<PlainTensor> out;
  for (auto& [key, t] : root.state_dict()) {  // everything else, as it is
    bool inside = false;
    for (const auto& [p, l] : layers) inside = inside || key.starts_with(p + ".");
    if (!inside) out.push_back({key, t.shape(), [v = t](DType dt) { return cast_floating(v.detach(), dt); }});
  }
  for (auto& [path, layer] : layers) {
    const std::string prefix = path.empty() ? "" : path + ".";
    LinearBase* l = layer;
    if (const auto* nf4 = dynamic_cast<const NF4Linear*>(l); nf4 && nf4_as_bnb) {
      for (auto& [key, t] : quant::bnb_nf4_tensors(prefix + "weight", nf4->weight()))  // stored as they are
        out.push_back({key, t.shape(), [v = t](DType) { return v; }});
    } else {
      KILN_CHECK(!nf4_as_bnb || !dynamic_cast<const LoraLinear*>(l), "merge",
                 "{}: a LoRA layer has no bnb-4bit form (merge it into a plain checkpoint instead)", path);
      out.push_back({prefix + "weight", Shape{l->out_features(), l->in_features()}, [l](DType dt) { return plain_weight(*l, dt); }});
    }
    if (plain_bias(*l, DType::f32).defined())
      out.push_back({prefix + "bias", Shape{l->out_features()}, [l](DType dt) { return plain_bias(*l, dt); }});
  }
  std::sort(out.begin(), out.end(), [](const PlainTensor& a, const PlainTensor& b) { return a.key < b.key; });
  return out;
}

}  // namespace kiln::nn

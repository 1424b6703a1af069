// NF4Linear: a frozen linear layer whose weight is stored as NF4 (quant/nf4.h), the QLoRA base.
// Its buffers are bitsandbytes' tensors (packed codes, 8-bit absmax, nested absmax and code);
// forward dequantises on the fly (quant::nf4_linear keeps nothing dequantised for backward), unless
// the layer keeps its weight dequantised (keep_dequantized).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "nn/layers.h"
#include "quant/nf4.h"

namespace kiln::nn {

class NF4Linear : public LinearBase {
 public:
  // `weight` (out, in) quantised; `bias` (out) optional, kept in its dtype and frozen.
  NF4Linear(quant::NF4Weight weight, Tensor bias = Tensor());
  // Quantises a Linear's weight (bnb's double quantisation by default) on the weight's device.
  static std::shared_ptr<NF4Linear> from_linear(const Linear& linear, bool double_quant = true);
  std::string type_name() const override { return "NF4Linear"; }
  Tensor forward(const Tensor& x) override;
  const quant::NF4Weight& weight() const { return weight_; }
  Tensor dequantized_weight(DType dtype) const;  // (out, in)
  // Keeps the weight dequantised in the input's dtype from one call to the next: no dequantisation in
  // forward or backward, for out * in * itemsize bytes held. Built at the next forward; built again
  // when the NF4 tensors are written or moved (load_state_dict, to()); freed when turned off. Off by
  // default; nn::plan_memory turns it on for the layers its budget has room for. Compiled layers
  // (compile/) trace the plain op and do not use it.
  void keep_dequantized(bool on);
  bool keeps_dequantized() const { return keep_dense_; }

 protected:
  Tensor forward_add(const Tensor& x, const Tensor& residual) override;

 private:
  Tensor run(const Tensor& x, const Tensor& residual);  // residual: undefined, or the GEMM's addend
  quant::NF4Weight weight_;  // its tensors are this module's buffers (moved in place by to())
  bool keep_dense_ = false;
  Tensor dense_;                      // (out, in) in the last input's dtype, or undefined
  std::vector<std::pair<const void*, uint64_t>> dense_of_;  // the NF4 tensors' (data, version) it was built from
};

// Replaces every Linear below `root` by an NF4Linear (the bf16 weights are released as it goes);
// returns how many were replaced.
int64_t quantize_linears_nf4(Module& root, bool double_quant = true);

}  // namespace kiln::nn

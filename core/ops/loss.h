// Loss primitives: CrossEntropy (fused log-softmax + NLL with ignore_index and a reduction), its
// backward, and CrossEntropyLossGrad (loss and gradient in one pass, for chunked heads). Kernels in core/cpu/loss.cpp and core/cuda/loss.cu; composite fallback
// cross_entropy_composite (core/ops.h).
#pragma once
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

const char* reduction_name(Reduction r);

// logits (N, V) float, targets (N) i64/i32 -> per-row lse - logit[target] (computed in f32, f64 for
// f64) reduced as asked, in logits' dtype: (N) for none (0 at ignored rows), 0-d for sum/mean; mean
// divides by the count of non-ignored rows and is 0 when every row is ignored. A target outside
// [0, V) that is not ignore_index is an error naming the row and the value. check_targets = false
// (cross_entropy_unchecked: the caller validated the targets) skips that check where it costs a host
// synchronisation (CUDA); such a target then gives an unspecified loss (never an out-of-bounds read).
// The CPU kernel checks regardless (free there).
class CrossEntropy : public Primitive {
 public:
  CrossEntropy(int64_t ignore_index, Reduction reduction, bool check_targets = true)
      : ignore_index_(ignore_index), reduction_(reduction), check_targets_(check_targets) {}
  const char* name() const override { return "cross_entropy"; }
  std::vector<Attr> attrs() const override {
    return {{"ignore_index", ignore_index_},
            {"reduction", EnumAttr{static_cast<int64_t>(reduction_), reduction_name(reduction_)}},
            {"check_targets", check_targets_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
  int64_t ignore_index() const { return ignore_index_; }
  Reduction reduction() const { return reduction_; }
  bool check_targets() const { return check_targets_; }

 private:
  int64_t ignore_index_;
  Reduction reduction_;
  bool check_targets_;
};

// (logits (N, V), targets (N), grad of the loss (N) or 0-d) -> dlogits = (softmax - onehot) * scale
// per row, zero at ignored rows. Second-order gradients are not implemented (use
// cross_entropy_composite). check_targets as for CrossEntropy; CrossEntropy's vjp builds it with
// check_targets = false, since the forward already validated (or was told to trust) the same targets.
class CrossEntropyBackward : public Primitive {
 public:
  CrossEntropyBackward(int64_t ignore_index, Reduction reduction, bool check_targets = true)
      : ignore_index_(ignore_index), reduction_(reduction), check_targets_(check_targets) {}
  const char* name() const override { return "cross_entropy_backward"; }
  std::vector<Attr> attrs() const override {
    return {{"ignore_index", ignore_index_},
            {"reduction", EnumAttr{static_cast<int64_t>(reduction_), reduction_name(reduction_)}},
            {"check_targets", check_targets_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }  // its vjp throws a clear error
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  int64_t ignore_index() const { return ignore_index_; }
  Reduction reduction() const { return reduction_; }
  bool check_targets() const { return check_targets_; }

 private:
  int64_t ignore_index_;
  Reduction reduction_;
  bool check_targets_;
};

// (logits (N, V), targets (N) validated, scale 0-d float) -> (loss (N) in the compute dtype, dlogits
// (N, V) in logits' dtype): cross_entropy_loss_grad_ (core/ops.h) runs it with dlogits written over
// the logits (its kernels allow that alias: a row's statistics and target logit are read before the
// row is overwritten). Not differentiable: it is its own backward.
class CrossEntropyLossGrad : public Primitive {
 public:
  CrossEntropyLossGrad(int64_t ignore_index, double label_smoothing, double z_loss_weight)
      : ignore_index_(ignore_index), label_smoothing_(label_smoothing), z_loss_weight_(z_loss_weight) {}
  const char* name() const override { return "cross_entropy_loss_grad"; }
  std::vector<Attr> attrs() const override {
    return {{"ignore_index", ignore_index_}, {"label_smoothing", label_smoothing_}, {"z_loss_weight", z_loss_weight_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  int64_t ignore_index() const { return ignore_index_; }
  double label_smoothing() const { return label_smoothing_; }
  double z_loss_weight() const { return z_loss_weight_; }

 private:
  int64_t ignore_index_;
  double label_smoothing_, z_loss_weight_;
};

}  // namespace kiln::prim

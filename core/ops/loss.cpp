// Cross-entropy: the public functions (checked and unchecked targets), the shape rules and vjps of
// CrossEntropy and CrossEntropyBackward, and the composite fallback (log_softmax + one-hot select).
#include "core/ops/loss.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

void check_cross_entropy(const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy";
  KILN_CHECK(logits.dim() == 2, op, "logits must be 2-d (N, V), found shape {}", shape_str(logits.shape()));
  KILN_CHECK(is_floating(logits.dtype()), op, "logits must be a float tensor, found {}", dtype_name(logits.dtype()));
  KILN_CHECK(is_index(targets.dtype()), op, "targets must be i64 or i32, found {}", dtype_name(targets.dtype()));
  KILN_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
             "targets must be ({},) to match logits {}, found {}", logits.size(0), shape_str(logits.shape()),
             shape_str(targets.shape()));
}

Shape loss_shape(const Tensor& logits, Reduction r) {
  return r == Reduction::none ? Shape{logits.size(0)} : Shape{};
}

}  // namespace

namespace prim {

const char* reduction_name(Reduction r) {
  switch (r) {
    case Reduction::none: return "none";
    case Reduction::sum: return "sum";
    case Reduction::mean: return "mean";
  }
  return "?";
}

std::vector<TensorMeta> CrossEntropy::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (logits, targets), found {}", in.size());
  check_cross_entropy(in[0], in[1]);
  return {{loss_shape(in[0], reduction_), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> CrossEntropy::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                      const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  // The forward validated these targets (or its caller did): the backward does not check them again.
  return {dispatch1(std::make_shared<const CrossEntropyBackward>(ignore_index_, reduction_, false),
                    {in[0], in[1], cot[0]}),
          Tensor()};
}

std::vector<TensorMeta> CrossEntropyBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (logits, targets, grad), found {}", in.size());
  check_cross_entropy(in[0], in[1]);
  const Shape want = loss_shape(in[0], reduction_);
  KILN_CHECK(in[2].shape() == want && is_floating(in[2].dtype()), name(),
             "grad of the loss must be a float tensor of shape {}, found {} {}", shape_str(want),
             dtype_name(in[2].dtype()), shape_str(in[2].shape()));
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> CrossEntropyBackward::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&,
                                              const std::vector<Tensor>&, const std::vector<bool>&) const {
  KILN_FAIL(name(), "second-order gradients of cross_entropy are not implemented; use cross_entropy_composite");
}

std::vector<TensorMeta> CrossEntropyLossGrad::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (logits, targets, scale), found {}", in.size());
  check_cross_entropy(in[0], in[1]);
  KILN_CHECK(in[2].dim() == 0 && is_floating(in[2].dtype()), name(), "scale must be a 0-d float tensor, found {} {}",
             dtype_name(in[2].dtype()), shape_str(in[2].shape()));
  KILN_CHECK(in[1].device() == in[0].device() && in[2].device() == in[0].device(), name(),
             "logits, targets and scale must be on one device, found {}, {} and {}", in[0].device().str(),
             in[1].device().str(), in[2].device().str());
  KILN_CHECK(label_smoothing_ >= 0.0 && label_smoothing_ <= 1.0, name(), "label_smoothing must be in [0, 1], found {}",
             label_smoothing_);
  return {{{in[0].size(0)}, compute_dtype(in[0].dtype()), in[0].device()}, {in[0].shape(), in[0].dtype(), in[0].device()}};
}

}  // namespace prim

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, Reduction reduction) {
  return dispatch1(std::make_shared<const prim::CrossEntropy>(ignore_index, reduction), {logits, targets});
}

Tensor cross_entropy_unchecked(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                               Reduction reduction) {
  return dispatch1(std::make_shared<const prim::CrossEntropy>(ignore_index, reduction, false), {logits, targets});
}

Tensor cross_entropy_loss_grad_(const Tensor& logits, const Tensor& targets, const Tensor& scale, int64_t ignore_index,
                                double label_smoothing, double z_loss_weight) {
  KILN_CHECK(logits.defined() && logits.is_contiguous(), "cross_entropy_loss_grad_",
             "logits must be a defined contiguous tensor (its rows are overwritten with their gradient)");
  auto op = std::make_shared<const prim::CrossEntropyLossGrad>(ignore_index, label_smoothing, z_loss_weight);
  std::vector<Tensor> out{empty({logits.dim() == 2 ? logits.size(0) : 0}, compute_dtype(logits.dtype()), logits.device()),
                          logits};
  dispatch_into(op, {logits, targets, scale}, out);
  return out[0];
}

Tensor cross_entropy_composite(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                               Reduction reduction) {
  // Targets are not range-checked here (that needs their values on the host): an out-of-range
  // target simply picks no logit.
  check_cross_entropy(logits, targets);
  const DType ct = compute_dtype(logits.dtype());
  const int64_t v = logits.size(1);
  Tensor logp = log_softmax(cast(logits, ct), -1);                               // (N, V)
  Tensor tgt = cast(targets, DType::i64);                                        // (N)
  Tensor onehot = eq(unsqueeze(arange(v, DType::i64, logits.device()), 0), unsqueeze(tgt, 1));  // (N, V)
  Tensor zero = scalar_tensor(0.0, ct, logits.device());                            // () broadcast by where
  Tensor nll = neg(sum(where(onehot, logp, zero), {1}));                            // (N)
  Tensor valid = ne(tgt, static_cast<double>(ignore_index));                        // (N) bool
  nll = where(valid, nll, zero);
  switch (reduction) {
    case Reduction::none: return cast(nll, logits.dtype());
    case Reduction::sum: return cast(sum(nll), logits.dtype());
    case Reduction::mean: break;
  }
  Tensor count = sum(cast(valid, ct));  // 0-d; all ignored -> 0 / 1 = 0
  return cast(div(sum(nll), maximum(count, 1.0)), logits.dtype());
}

}  // namespace kiln

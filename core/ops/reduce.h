// Reduction primitives: sum/mean/amax/amin over a set of dims, argmax along one dim, logsumexp, and
// softmax / log_softmax along one dim. The public functions (core/ops.h) normalise dims; the
// primitives hold exactly the reduced dims, sorted and non-negative (none for a 0-d input).
#pragma once
#include <string>
#include <vector>

#include "core/primitive.h"

namespace kiln::prim {

enum class ReduceKind { sum, mean, max, min };

// sum (float -> same dtype, int/bool -> i64), mean (floats only), amax/amin (any dtype, non-empty
// reduction). `in_shape` is the input's shape, recorded so the vjp of sum/mean saves no tensor.
class Reduce : public Primitive {
 public:
  Reduce(ReduceKind kind, std::vector<int64_t> dims, bool keepdim, Shape in_shape);
  const char* name() const override;
  std::vector<Attr> attrs() const override {
    return {{"kind", EnumAttr{static_cast<int64_t>(kind_), name()}},
            {"dims", dims_},
            {"keepdim", keepdim_},
            {"in_shape", in_shape_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  // amax/amin find their maxima again in backward; sum/mean need only shapes.
  bool vjp_needs_inputs() const override { return kind_ == ReduceKind::max || kind_ == ReduceKind::min; }
  bool vjp_needs_outputs() const override { return vjp_needs_inputs(); }

  ReduceKind kind() const { return kind_; }
  const std::vector<int64_t>& dims() const { return dims_; }
  bool keepdim() const { return keepdim_; }

 private:
  ReduceKind kind_;
  std::vector<int64_t> dims_;
  bool keepdim_;
  Shape in_shape_;
};

// Index (i64) of the first maximum along `dim`; a NaN counts as the maximum. Not differentiable.
class ArgMax : public Primitive {
 public:
  ArgMax(int64_t dim, bool keepdim) : dim_(dim), keepdim_(keepdim) {}
  const char* name() const override { return "argmax"; }
  std::vector<Attr> attrs() const override { return {{"dim", dim_}, {"keepdim", keepdim_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;

  int64_t dim() const { return dim_; }  // wrapped; ignored for a 0-d input
  bool keepdim() const { return keepdim_; }

 private:
  int64_t dim_;
  bool keepdim_;
};

// log(sum(exp(x))) over `dims`, computed as m + log(sum(exp(x - m))) with m the maximum. A reduction
// whose maximum is not finite gives that maximum: all -inf (or empty) -> -inf, any +inf -> +inf,
// any NaN -> NaN. The vjp treats an all -inf reduction as having zero gradient.
class LogSumExp : public Primitive {
 public:
  LogSumExp(std::vector<int64_t> dims, bool keepdim) : dims_(std::move(dims)), keepdim_(keepdim) {}
  const char* name() const override { return "logsumexp"; }
  std::vector<Attr> attrs() const override { return {{"dims", dims_}, {"keepdim", keepdim_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;

  const std::vector<int64_t>& dims() const { return dims_; }
  bool keepdim() const { return keepdim_; }

 private:
  std::vector<int64_t> dims_;
  bool keepdim_;
};

// softmax (log = false) or log_softmax (log = true) along `dim`, with the row maximum subtracted.
// A row that is entirely -inf gives zeros (softmax) or -inf (log_softmax) instead of NaN, and its
// gradient follows the same formulas with softmax = 0; rows holding +inf or NaN give NaN.
class Softmax : public Primitive {
 public:
  Softmax(int64_t dim, bool log) : dim_(dim), log_(log) {}
  const char* name() const override { return log_ ? "log_softmax" : "softmax"; }
  std::vector<Attr> attrs() const override { return {{"dim", dim_}, {"log", log_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_inputs() const override { return false; }

  int64_t dim() const { return dim_; }  // wrapped; a 0-d input is a row of one
  bool log() const { return log_; }

 private:
  int64_t dim_;
  bool log_;
};

}  // namespace kiln::prim

// Elementwise primitives: Unary (neg, exp, gelu, ...), Binary (add, ..., comparisons -> bool) and
// Where (select by a bool condition). Binary and Where broadcast numpy-style; their vjps sum the
// gradient of a broadcast input back to its shape with sum_to.
#pragma once
#include <string>
#include <vector>

#include "core/functors.h"
#include "core/primitive.h"

namespace kiln::prim {

class Unary : public Primitive {
 public:
  explicit Unary(UnaryOp op) : op_(op) {}
  UnaryOp op() const { return op_; }

  const char* name() const override { return unary_op_name(op_); }
  std::vector<Attr> attrs() const override { return {{"op", EnumAttr{static_cast<int64_t>(op_), unary_op_name(op_)}}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_inputs() const override;
  bool vjp_needs_outputs() const override;

 private:
  UnaryOp op_;
};

// a op b. The operand shapes given to the second constructor let add and sub reduce broadcast
// gradients without saving their inputs (a replay with other shapes that broadcast differently gets
// a clear shape error from backward, never a wrong gradient); without them those ops save the inputs
// to read their shapes.
class Binary : public Primitive {
 public:
  explicit Binary(BinaryOp op) : op_(op) {}
  Binary(BinaryOp op, Shape a_shape, Shape b_shape)
      : op_(op), shapes_{std::move(a_shape), std::move(b_shape)}, has_shapes_(true) {}
  BinaryOp op() const { return op_; }

  const char* name() const override { return binary_op_name(op_); }
  std::vector<Attr> attrs() const override {
    return {{"op", EnumAttr{static_cast<int64_t>(op_), binary_op_name(op_)}},
            {"a_shape", shapes_[0]},
            {"b_shape", shapes_[1]},
            {"has_shapes", has_shapes_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return !binary_is_comparison(op_); }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_inputs() const override;
  bool vjp_needs_outputs() const override { return op_ == BinaryOp::pow; }

 private:
  BinaryOp op_;
  Shape shapes_[2];
  bool has_shapes_ = false;
};

// where(cond, a, b): a where cond is true, b elsewhere; cond bool, a and b of one dtype, all three
// broadcast together.
class Where : public Primitive {
 public:
  const char* name() const override { return "where"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_inputs() const override { return true; }
  bool vjp_needs_outputs() const override { return false; }
};

}  // namespace kiln::prim

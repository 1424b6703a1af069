// Elementwise ops: the public functions of core/ops.h section "elementwise", the shape/dtype rules
// of the Unary, Binary and Where primitives, and their vjps (written with other public ops, so the
// backward pass goes through dispatch too).
#include "core/ops/elementwise.h"

#include <memory>
#include <numbers>

#include "core/dispatch.h"
#include "core/ops.h"

namespace kiln {
namespace prim {
namespace {

// The gradient of an input of shape `s` from a gradient of the broadcast shape.
Tensor reduce_to(const Tensor& g, const Shape& s) { return g.shape() == s ? g : sum_to(g, s); }

// 0/1 mask of `cond` (bool) in dtype `d`.
Tensor mask_as(const Tensor& cond, DType d) { return cast(cond, d); }

}  // namespace

// ---- Unary

std::vector<TensorMeta> Unary::infer(const std::vector<Tensor>& inputs) const {
  KILN_CHECK(inputs.size() == 1, name(), "expected 1 input, given {}", inputs.size());
  const Tensor& x = inputs[0];
  if (unary_is_float_only(op_)) {
    KILN_CHECK(is_floating(x.dtype()), name(), "expected a floating-point tensor, found {}; cast it to a float dtype first",
               dtype_name(x.dtype()));
  } else {
    KILN_CHECK(x.dtype() != DType::boolean, name(), "not defined for bool tensors; cast to a numeric dtype first");
  }
  return {{x.shape(), x.dtype(), x.device()}};
}

bool Unary::vjp_needs_inputs() const {
  switch (op_) {
    case UnaryOp::abs:
    case UnaryOp::log:
    case UnaryOp::sin:
    case UnaryOp::cos:
    case UnaryOp::erf:
    case UnaryOp::silu:
    case UnaryOp::gelu:
    case UnaryOp::square: return true;
    default: return false;
  }
}

bool Unary::vjp_needs_outputs() const {
  switch (op_) {
    case UnaryOp::exp:
    case UnaryOp::sqrt:
    case UnaryOp::rsqrt:
    case UnaryOp::tanh:
    case UnaryOp::sigmoid:
    case UnaryOp::relu: return true;
    default: return false;
  }
}

std::vector<Tensor> Unary::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                               const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor()};
  const Tensor& g = cotangents[0];
  // x and out are only read by the ops that saved them (vjp_needs_inputs / vjp_needs_outputs).
  auto x = [&]() -> const Tensor& { return inputs[0]; };
  auto out = [&]() -> const Tensor& { return outputs[0]; };
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  switch (op_) {
    case UnaryOp::neg: return {neg(g)};
    case UnaryOp::abs: return {mul(g, sign(x()))};
    case UnaryOp::sign: return {zeros_like(g)};
    case UnaryOp::exp: return {mul(g, out())};
    case UnaryOp::log: return {div(g, x())};
    case UnaryOp::sqrt: return {div(g, mul(out(), 2.0))};
    case UnaryOp::rsqrt: return {mul(mul(g, -0.5), mul(out(), square(out())))};  // -g/2 out^3
    case UnaryOp::sin: return {mul(g, cos(x()))};
    case UnaryOp::cos: return {neg(mul(g, sin(x())))};
    case UnaryOp::tanh: return {mul(g, 1.0 - square(out()))};
    case UnaryOp::erf: return {mul(g, mul(exp(neg(square(x()))), 2.0 * std::numbers::inv_sqrtpi))};
    case UnaryOp::sigmoid: return {mul(g, mul(out(), 1.0 - out()))};
    case UnaryOp::silu: {  // s (1 + x (1 - s))
      Tensor s = sigmoid(x());
      return {mul(g, mul(s, 1.0 + mul(x(), 1.0 - s)))};
    }
    case UnaryOp::relu: return {mul(g, mask_as(gt(out(), 0.0), g.dtype()))};
    case UnaryOp::gelu: {  // Phi(x) + x phi(x)
      Tensor cdf = mul(1.0 + erf(mul(x(), kInvSqrt2)), 0.5);
      Tensor pdf = mul(exp(mul(square(x()), -0.5)), kInvSqrt2 * std::numbers::inv_sqrtpi);
      return {mul(g, cdf + mul(x(), pdf))};
    }
    case UnaryOp::square: return {mul(g, mul(x(), 2.0))};
  }
  KILN_FAIL(name(), "unknown unary op");
}

// ---- Binary

std::vector<TensorMeta> Binary::infer(const std::vector<Tensor>& inputs) const {
  KILN_CHECK(inputs.size() == 2, name(), "expected 2 inputs, given {}", inputs.size());
  const Tensor& a = inputs[0];
  const Tensor& b = inputs[1];
  KILN_CHECK(a.dtype() == b.dtype(), name(), "dtype mismatch: {} and {}", dtype_name(a.dtype()), dtype_name(b.dtype()));
  KILN_CHECK(a.device() == b.device(), name(), "device mismatch: {} and {}", a.device().str(), b.device().str());
  const DType d = a.dtype();
  if (d == DType::boolean) {
    KILN_CHECK(op_ == BinaryOp::eq || op_ == BinaryOp::ne, name(),
               "not defined for bool tensors (only eq and ne are); cast to a numeric dtype first");
  } else if (!is_floating(d) && binary_is_float_only(op_)) {
    KILN_FAIL(name(), "not defined for integer tensors ({}); cast to a floating dtype first", dtype_name(d));
  }
  Shape s = broadcast_shapes(a.shape(), b.shape(), name());
  return {{std::move(s), binary_is_comparison(op_) ? DType::boolean : d, a.device()}};
}

bool Binary::vjp_needs_inputs() const {
  switch (op_) {
    case BinaryOp::add:
    case BinaryOp::sub: return !has_shapes_;  // only their shapes are read
    case BinaryOp::mul:
    case BinaryOp::div:
    case BinaryOp::pow:
    case BinaryOp::maximum:
    case BinaryOp::minimum: return true;
    default: return false;
  }
}

std::vector<Tensor> Binary::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  const Tensor& g = cotangents[0];
  // Input shapes: from the saved inputs, else from the shapes given at construction (operands of one
  // shape then mean "no broadcasting": the gradient keeps g's shape, whatever the shapes of a replay).
  auto shape = [&](size_t i) -> const Shape& {
    if (!inputs.empty()) return inputs[i].shape();
    return shapes_[0] == shapes_[1] ? g.shape() : shapes_[i];
  };
  auto a = [&]() -> const Tensor& { return inputs[0]; };
  auto b = [&]() -> const Tensor& { return inputs[1]; };
  std::vector<Tensor> grads(2);
  switch (op_) {
    case BinaryOp::add:
      if (wanted[0]) grads[0] = reduce_to(g, shape(0));
      if (wanted[1]) grads[1] = reduce_to(g, shape(1));
      break;
    case BinaryOp::sub:
      if (wanted[0]) grads[0] = reduce_to(g, shape(0));
      if (wanted[1]) grads[1] = neg(reduce_to(g, shape(1)));
      break;
    case BinaryOp::mul:
      if (wanted[0]) grads[0] = reduce_to(mul(g, b()), shape(0));
      if (wanted[1]) grads[1] = reduce_to(mul(g, a()), shape(1));
      break;
    case BinaryOp::div: {  // d/da = g / b, d/db = -(g / b) (a / b)
      Tensor q = div(g, b());
      if (wanted[0]) grads[0] = reduce_to(q, shape(0));
      if (wanted[1]) grads[1] = reduce_to(neg(mul(q, div(a(), b()))), shape(1));
      break;
    }
    case BinaryOp::pow:  // d/da = g b a^(b-1), d/db = g out log(a)
      if (wanted[0]) grads[0] = reduce_to(mul(g, mul(b(), pow(a(), sub(b(), 1.0)))), shape(0));
      if (wanted[1]) grads[1] = reduce_to(mul(g, mul(outputs[0], log(a()))), shape(1));
      break;
    case BinaryOp::maximum:
    case BinaryOp::minimum: {  // the winner takes g; ties split it half and half
      Tensor wins = op_ == BinaryOp::maximum ? gt(a(), b()) : lt(a(), b());
      Tensor weight_a = mask_as(wins, g.dtype()) + mul(mask_as(eq(a(), b()), g.dtype()), 0.5);
      Tensor ga = mul(g, weight_a);
      if (wanted[0]) grads[0] = reduce_to(ga, shape(0));
      if (wanted[1]) grads[1] = reduce_to(sub(g, ga), shape(1));
      break;
    }
    default: KILN_FAIL(name(), "comparisons are not differentiable");
  }
  return grads;
}

// ---- Where

std::vector<TensorMeta> Where::infer(const std::vector<Tensor>& inputs) const {
  KILN_CHECK(inputs.size() == 3, name(), "expected 3 inputs (cond, a, b), given {}", inputs.size());
  const Tensor& c = inputs[0];
  const Tensor& a = inputs[1];
  const Tensor& b = inputs[2];
  KILN_CHECK(c.dtype() == DType::boolean, name(), "condition must be bool, found {}", dtype_name(c.dtype()));
  KILN_CHECK(a.dtype() == b.dtype(), name(), "dtype mismatch: {} and {}", dtype_name(a.dtype()), dtype_name(b.dtype()));
  KILN_CHECK(c.device() == a.device() && a.device() == b.device(), name(), "device mismatch: {}, {} and {}",
             c.device().str(), a.device().str(), b.device().str());
  Shape s = broadcast_shapes(broadcast_shapes(c.shape(), a.shape(), name()), b.shape(), name());
  return {{std::move(s), a.dtype(), a.device()}};
}

std::vector<Tensor> Where::vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>&,
                               const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const {
  const Tensor& g = cotangents[0];
  const Tensor& c = inputs[0];
  Tensor zero = scalar_tensor(0.0, g.dtype(), g.device());
  std::vector<Tensor> grads(3);
  if (wanted[1]) grads[1] = reduce_to(where(c, g, zero), inputs[1].shape());
  if (wanted[2]) grads[2] = reduce_to(where(c, zero, g), inputs[2].shape());
  return grads;
}

}  // namespace prim

// ---- public functions

namespace {

Tensor unary(UnaryOp op, const Tensor& x) { return dispatch1(std::make_shared<const prim::Unary>(op), {x}); }

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  const bool keep_shapes = (op == BinaryOp::add || op == BinaryOp::sub) && a.defined() && b.defined();
  PrimitivePtr p = keep_shapes ? std::make_shared<const prim::Binary>(op, a.shape(), b.shape())
                               : std::make_shared<const prim::Binary>(op);
  return dispatch1(std::move(p), {a, b});
}

// A 0-d tensor holding `v` in the dtype and on the device of `like`.
Tensor scalar_like(const Tensor& like, double v, BinaryOp op) {
  KILN_CHECK(like.defined(), binary_op_name(op), "the tensor operand is an undefined tensor");
  return scalar_tensor(v, like.dtype(), like.device());
}

Tensor binary(BinaryOp op, const Tensor& a, double b) { return binary(op, a, scalar_like(a, b, op)); }
Tensor binary(BinaryOp op, double a, const Tensor& b) { return binary(op, scalar_like(b, a, op), b); }

}  // namespace

Tensor neg(const Tensor& x) { return unary(UnaryOp::neg, x); }
Tensor abs(const Tensor& x) { return unary(UnaryOp::abs, x); }
Tensor sign(const Tensor& x) { return unary(UnaryOp::sign, x); }
Tensor exp(const Tensor& x) { return unary(UnaryOp::exp, x); }
Tensor log(const Tensor& x) { return unary(UnaryOp::log, x); }
Tensor sqrt(const Tensor& x) { return unary(UnaryOp::sqrt, x); }
Tensor rsqrt(const Tensor& x) { return unary(UnaryOp::rsqrt, x); }
Tensor sin(const Tensor& x) { return unary(UnaryOp::sin, x); }
Tensor cos(const Tensor& x) { return unary(UnaryOp::cos, x); }
Tensor tanh(const Tensor& x) { return unary(UnaryOp::tanh, x); }
Tensor erf(const Tensor& x) { return unary(UnaryOp::erf, x); }
Tensor sigmoid(const Tensor& x) { return unary(UnaryOp::sigmoid, x); }
Tensor silu(const Tensor& x) { return unary(UnaryOp::silu, x); }
Tensor relu(const Tensor& x) { return unary(UnaryOp::relu, x); }
Tensor gelu(const Tensor& x) { return unary(UnaryOp::gelu, x); }
Tensor square(const Tensor& x) { return unary(UnaryOp::square, x); }

Tensor add(const Tensor& a, const Tensor& b) { return binary(BinaryOp::add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary(BinaryOp::sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary(BinaryOp::mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary(BinaryOp::div, a, b); }
Tensor pow(const Tensor& a, const Tensor& b) { return binary(BinaryOp::pow, a, b); }
Tensor maximum(const Tensor& a, const Tensor& b) { return binary(BinaryOp::maximum, a, b); }
Tensor minimum(const Tensor& a, const Tensor& b) { return binary(BinaryOp::minimum, a, b); }
Tensor add(const Tensor& a, double b) { return binary(BinaryOp::add, a, b); }
Tensor sub(const Tensor& a, double b) { return binary(BinaryOp::sub, a, b); }
Tensor mul(const Tensor& a, double b) { return binary(BinaryOp::mul, a, b); }
Tensor div(const Tensor& a, double b) { return binary(BinaryOp::div, a, b); }
Tensor pow(const Tensor& a, double b) { return binary(BinaryOp::pow, a, b); }
Tensor maximum(const Tensor& a, double b) { return binary(BinaryOp::maximum, a, b); }
Tensor minimum(const Tensor& a, double b) { return binary(BinaryOp::minimum, a, b); }

Tensor eq(const Tensor& a, const Tensor& b) { return binary(BinaryOp::eq, a, b); }
Tensor ne(const Tensor& a, const Tensor& b) { return binary(BinaryOp::ne, a, b); }
Tensor lt(const Tensor& a, const Tensor& b) { return binary(BinaryOp::lt, a, b); }
Tensor le(const Tensor& a, const Tensor& b) { return binary(BinaryOp::le, a, b); }
Tensor gt(const Tensor& a, const Tensor& b) { return binary(BinaryOp::gt, a, b); }
Tensor ge(const Tensor& a, const Tensor& b) { return binary(BinaryOp::ge, a, b); }
Tensor eq(const Tensor& a, double b) { return binary(BinaryOp::eq, a, b); }
Tensor ne(const Tensor& a, double b) { return binary(BinaryOp::ne, a, b); }
Tensor lt(const Tensor& a, double b) { return binary(BinaryOp::lt, a, b); }
Tensor le(const Tensor& a, double b) { return binary(BinaryOp::le, a, b); }
Tensor gt(const Tensor& a, double b) { return binary(BinaryOp::gt, a, b); }
Tensor ge(const Tensor& a, double b) { return binary(BinaryOp::ge, a, b); }

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return dispatch1(std::make_shared<const prim::Where>(), {cond, a, b});
}

Tensor operator-(const Tensor& x) { return neg(x); }
Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
Tensor operator+(const Tensor& a, double b) { return add(a, b); }
Tensor operator-(const Tensor& a, double b) { return sub(a, b); }
Tensor operator*(const Tensor& a, double b) { return mul(a, b); }
Tensor operator/(const Tensor& a, double b) { return div(a, b); }
Tensor operator+(double a, const Tensor& b) { return binary(BinaryOp::add, a, b); }
Tensor operator-(double a, const Tensor& b) { return binary(BinaryOp::sub, a, b); }
Tensor operator*(double a, const Tensor& b) { return binary(BinaryOp::mul, a, b); }
Tensor operator/(double a, const Tensor& b) { return binary(BinaryOp::div, a, b); }

}  // namespace kiln

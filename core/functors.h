// Scalar functors of the elementwise ops (UnaryOp, BinaryOp), shared by the CPU kernels, the CUDA
// kernels and the JIT's generated code. Dependency-free on purpose: NVRTC sees only this file, so no
// standard headers are included there and math goes through the builtins CUDA predeclares.
#pragma once

#ifndef KILN_HD  // same definition as core/philox.h
#if defined(__CUDACC__)
#define KILN_HD __host__ __device__ __forceinline__
#else
#define KILN_HD inline
#endif
#endif

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace kiln {

enum class UnaryOp : unsigned char {
  neg, abs, sign, exp, log, sqrt, rsqrt, sin, cos, tanh, erf, sigmoid, silu, relu, gelu, square
};
enum class BinaryOp : unsigned char { add, sub, mul, div, pow, maximum, minimum, eq, ne, lt, le, gt, ge };

inline constexpr int kNumUnaryOps = 16;
inline constexpr int kNumBinaryOps = 13;

KILN_HD constexpr const char* unary_op_name(UnaryOp op) {
  switch (op) {
    case UnaryOp::neg: return "neg";
    case UnaryOp::abs: return "abs";
    case UnaryOp::sign: return "sign";
    case UnaryOp::exp: return "exp";
    case UnaryOp::log: return "log";
    case UnaryOp::sqrt: return "sqrt";
    case UnaryOp::rsqrt: return "rsqrt";
    case UnaryOp::sin: return "sin";
    case UnaryOp::cos: return "cos";
    case UnaryOp::tanh: return "tanh";
    case UnaryOp::erf: return "erf";
    case UnaryOp::sigmoid: return "sigmoid";
    case UnaryOp::silu: return "silu";
    case UnaryOp::relu: return "relu";
    case UnaryOp::gelu: return "gelu";
    case UnaryOp::square: return "square";
  }
  return "unary";
}

KILN_HD constexpr const char* binary_op_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::add: return "add";
    case BinaryOp::sub: return "sub";
    case BinaryOp::mul: return "mul";
    case BinaryOp::div: return "div";
    case BinaryOp::pow: return "pow";
    case BinaryOp::maximum: return "maximum";
    case BinaryOp::minimum: return "minimum";
    case BinaryOp::eq: return "eq";
    case BinaryOp::ne: return "ne";
    case BinaryOp::lt: return "lt";
    case BinaryOp::le: return "le";
    case BinaryOp::gt: return "gt";
    case BinaryOp::ge: return "ge";
  }
  return "binary";
}

// Unary ops defined only on floating-point inputs (the rest also take integers).
KILN_HD constexpr bool unary_is_float_only(UnaryOp op) {
  return !(op == UnaryOp::neg || op == UnaryOp::abs || op == UnaryOp::sign || op == UnaryOp::relu ||
           op == UnaryOp::square);
}
// Comparisons produce bool.
KILN_HD constexpr bool binary_is_comparison(BinaryOp op) {
  return op == BinaryOp::eq || op == BinaryOp::ne || op == BinaryOp::lt || op == BinaryOp::le ||
         op == BinaryOp::gt || op == BinaryOp::ge;
}
// Binary ops defined only on floating-point inputs.
KILN_HD constexpr bool binary_is_float_only(BinaryOp op) { return op == BinaryOp::div || op == BinaryOp::pow; }

namespace fn {

template <class T> struct is_floating { static constexpr bool value = false; };
template <> struct is_floating<float> { static constexpr bool value = true; };
template <> struct is_floating<double> { static constexpr bool value = true; };

// Math on float/double: std:: on the host, CUDA's overloaded builtins on the device.
#if defined(__CUDACC__)
#define KILN_FN_MATH(f) ::f
#else
#define KILN_FN_MATH(f) std::f
#endif

template <class T> KILN_HD T exp(T x) { return KILN_FN_MATH(exp)(x); }
template <class T> KILN_HD T log(T x) { return KILN_FN_MATH(log)(x); }
template <class T> KILN_HD T sqrt(T x) { return KILN_FN_MATH(sqrt)(x); }
template <class T> KILN_HD T sin(T x) { return KILN_FN_MATH(sin)(x); }
template <class T> KILN_HD T cos(T x) { return KILN_FN_MATH(cos)(x); }
template <class T> KILN_HD T tanh(T x) { return KILN_FN_MATH(tanh)(x); }
template <class T> KILN_HD T erf(T x) { return KILN_FN_MATH(erf)(x); }
template <class T> KILN_HD T pow(T a, T b) { return KILN_FN_MATH(pow)(a, b); }
template <class T> KILN_HD bool isnan(T x) { return x != x; }
template <class T> KILN_HD T abs(T x) {
  if constexpr (is_floating<T>::value) {
    return KILN_FN_MATH(fabs)(x);
  } else {
    return x < T(0) ? -x : x;
  }
}
template <class T> KILN_HD T rsqrt(T x) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(x);
#else
  return T(1) / sqrt(x);
#endif
}
template <class T> KILN_HD T sigmoid(T x) { return T(1) / (T(1) + exp(-x)); }
// Exact gelu: x * Phi(x) with Phi the standard normal CDF.
template <class T> KILN_HD T gelu(T x) { return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752440))); }

#undef KILN_FN_MATH

}  // namespace fn

// f(x) for one element, computed in T (float, double or int64). The float-only ops return x
// unchanged for integer T; callers reject them before getting here.
template <class T> KILN_HD T apply_unary(UnaryOp op, T x) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::sign: return static_cast<T>((T(0) < x) - (x < T(0)));
    case UnaryOp::relu: return x < T(0) ? T(0) : x;  // keeps NaN
    case UnaryOp::square: return x * x;
    case UnaryOp::abs: return fn::abs(x);
    default: break;
  }
  if constexpr (fn::is_floating<T>::value) {
    switch (op) {
      case UnaryOp::exp: return fn::exp(x);
      case UnaryOp::log: return fn::log(x);
      case UnaryOp::sqrt: return fn::sqrt(x);
      case UnaryOp::rsqrt: return fn::rsqrt(x);
      case UnaryOp::sin: return fn::sin(x);
      case UnaryOp::cos: return fn::cos(x);
      case UnaryOp::tanh: return fn::tanh(x);
      case UnaryOp::erf: return fn::erf(x);
      case UnaryOp::sigmoid: return fn::sigmoid(x);
      case UnaryOp::silu: return x * fn::sigmoid(x);
      case UnaryOp::gelu: return fn::gelu(x);
      default: break;
    }
  }
  return x;
}

// a op b for one element pair, computed in T. Comparisons give T(1) or T(0) here; apply_compare
// gives the bool. maximum/minimum propagate NaN (as PyTorch does).
template <class T> KILN_HD bool apply_compare(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::eq: return a == b;
    case BinaryOp::ne: return a != b;
    case BinaryOp::lt: return a < b;
    case BinaryOp::le: return a <= b;
    case BinaryOp::gt: return a > b;
    case BinaryOp::ge: return a >= b;
    default: return false;
  }
}

template <class T> KILN_HD T apply_binary(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::add: return a + b;
    case BinaryOp::sub: return a - b;
    case BinaryOp::mul: return a * b;
    case BinaryOp::maximum:
    case BinaryOp::minimum: {
      if constexpr (fn::is_floating<T>::value) {
        if (fn::isnan(a)) return a;
        if (fn::isnan(b)) return b;
      }
      const bool take_a = op == BinaryOp::maximum ? a > b : a < b;
      return take_a ? a : b;
    }
    case BinaryOp::div:
      if constexpr (fn::is_floating<T>::value) return a / b;
      break;
    case BinaryOp::pow:
      if constexpr (fn::is_floating<T>::value) return fn::pow(a, b);
      break;
    default: return apply_compare(op, a, b) ? T(1) : T(0);
  }
  return a;
}

}  // namespace kiln

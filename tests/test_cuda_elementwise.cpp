// CUDA elementwise kernels against the CPU reference: every unary and binary op (comparisons too) and
// where, on random inputs of odd, broadcast, 0-d, large and non-contiguous shapes in every dtype they
// accept; NaN/inf rules; and autograd gradients of composite expressions computed on both devices.
#include <catch2/catch_test_macros.hpp>
#include <functional>
#include <limits>
#include <memory>

#include "autograd/engine.h"
#include "core/cuda/runtime.h"
#include "core/ops/elementwise.h"
#include "tests/helpers.h"

using namespace kiln;

namespace {

const Device kGPU{DeviceType::cuda, 0};
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

struct Tol {
  double rtol, atol;
};
Tol tol_for(DType d) {
  switch (d) {
    case DType::f64: return {1e-12, 1e-12};
    case DType::f32: return {1e-5, 1e-6};
    case DType::bf16: return {1e-2, 1e-3};
    case DType::f16: return {2e-3, 1e-4};
    default: return {0.0, 0.0};
  }
}

const DType kAllDtypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8};

// f on CPU inputs and on CUDA copies (made non-contiguous on request): same values within tol
// (exactly for integer and bool results).
void compare(const Fn& f, const std::vector<Tensor>& cpu, bool noncontiguous, Tol tol) {
  std::vector<Tensor> gpu;
  for (const Tensor& t : cpu) {
    Tensor g = t.to(kGPU);
    gpu.push_back(noncontiguous && t.dim() > 0 ? test::make_noncontiguous(g) : g);
  }
  Tensor want = f(cpu);
  Tensor got = f(gpu);
  REQUIRE(got.device() == kGPU);
  Tensor host = got.to(kCPU);
  if (is_floating(want.dtype())) {
    test::require_close(host, want, tol.rtol, tol.atol);
  } else {
    test::require_equal(host, want);
  }
}

const Shape kUnaryShapes[] = {{}, {1}, {7}, {3, 1, 5}, {5, 9, 13}, {257, 1031}};

struct ShapePair {
  Shape a, b;
};
const ShapePair kBinaryShapes[] = {
    {{7, 13}, {7, 13}},        {{}, {6, 5}},          {{6, 5}, {}},         {{3, 1, 5}, {4, 5}},
    {{2, 3, 4, 5}, {2, 1, 4, 1}}, {{1}, {17}},        {{64, 1025}, {1025}}, {{64, 1}, {1, 33}},
    {{100003}, {100003}},     {{64, 1024}, {1024}}, {{8, 3, 16}, {3, 1}}, {{16, 32}, {16, 1}},
};

bool needs_positive(UnaryOp op) { return op == UnaryOp::log || op == UnaryOp::sqrt || op == UnaryOp::rsqrt; }

}  // namespace

TEST_CASE("cuda unary ops match the CPU in every dtype and layout", "[cuda][elementwise]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 100;
  for (int i = 0; i < kNumUnaryOps; ++i) {
    const auto op = static_cast<UnaryOp>(i);
    for (DType d : kAllDtypes) {
      if (!is_floating(d) && unary_is_float_only(op)) continue;
      for (const Shape& s : kUnaryShapes) {
        for (bool nc : {false, true}) {
          INFO(unary_op_name(op) << " " << dtype_name(d) << " " << shape_str(s) << (nc ? " non-contiguous" : ""));
          Tensor x = needs_positive(op) ? test::random_away_from_zero(s, d, ++seed, true) : test::random_tensor(s, d, ++seed);
          compare([op](const std::vector<Tensor>& in) { return dispatch1(std::make_shared<const prim::Unary>(op), in); },
                  {x}, nc, tol_for(d));
        }
      }
    }
  }
}

TEST_CASE("cuda binary ops and comparisons match the CPU with broadcasting", "[cuda][elementwise]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 2000;
  for (int i = 0; i < kNumBinaryOps; ++i) {
    const auto op = static_cast<BinaryOp>(i);
    for (DType d : kAllDtypes) {
      if (!is_floating(d) && binary_is_float_only(op)) continue;
      for (const ShapePair& sp : kBinaryShapes) {
        for (bool nc : {false, true}) {
          INFO(binary_op_name(op) << " " << dtype_name(d) << " " << shape_str(sp.a) << " " << shape_str(sp.b)
                                  << (nc ? " non-contiguous" : ""));
          Tensor a = op == BinaryOp::pow ? test::random_away_from_zero(sp.a, d, ++seed, true) : test::random_tensor(sp.a, d, ++seed);
          Tensor b = op == BinaryOp::div ? test::random_away_from_zero(sp.b, d, ++seed) : test::random_tensor(sp.b, d, ++seed);
          compare([op](const std::vector<Tensor>& in) { return dispatch1(std::make_shared<const prim::Binary>(op), in); },
                  {a, b}, nc, tol_for(d));
        }
      }
    }
  }
  SECTION("bool eq/ne") {
    Tensor a = test::random_tensor({5, 7}, DType::boolean, 1), b = test::random_tensor({7}, DType::boolean, 2);
    compare([](const std::vector<Tensor>& in) { return eq(in[0], in[1]); }, {a, b}, true, {});
    compare([](const std::vector<Tensor>& in) { return ne(in[0], in[1]); }, {a, b}, false, {});
  }
}

TEST_CASE("cuda where matches the CPU with broadcasting", "[cuda][elementwise]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  struct Case {
    Shape c, a, b;
  };
  const Case cases[] = {{{5, 7}, {5, 7}, {5, 7}}, {{5, 1}, {7}, {}}, {{}, {3, 4}, {3, 4}},
                        {{2, 1, 9}, {3, 1}, {2, 3, 9}}, {{100001}, {100001}, {100001}}, {{4, 1}, {4, 64}, {64}}};
  uint64_t seed = 5000;
  const DType dtypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean};
  for (DType d : dtypes) {
    for (const Case& cs : cases) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(d) << " " << shape_str(cs.c) << " " << shape_str(cs.a) << " " << shape_str(cs.b));
        Tensor c = test::random_tensor(cs.c, DType::boolean, ++seed);
        Tensor a = test::random_tensor(cs.a, d, ++seed), b = test::random_tensor(cs.b, d, ++seed);
        compare([](const std::vector<Tensor>& in) { return where(in[0], in[1], in[2]); }, {c, a, b}, nc, {0.0, 0.0});
      }
    }
  }
}

TEST_CASE("cuda elementwise NaN and inf rules match the CPU", "[cuda][elementwise]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  const std::vector<double> av = {kNaN, 1.0, -kInf, kInf, 0.0, -0.0, kNaN, 3.0};
  const std::vector<double> bv = {1.0, kNaN, 2.0, kInf, -0.0, 0.0, kNaN, -kInf};
  for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    Tensor a = cast(from_vector<double>(av, {8}), d), b = cast(from_vector<double>(bv, {8}), d);
    for (int i = 0; i < kNumBinaryOps; ++i) {
      const auto op = static_cast<BinaryOp>(i);
      INFO(binary_op_name(op) << " " << dtype_name(d));
      compare([op](const std::vector<Tensor>& in) { return dispatch1(std::make_shared<const prim::Binary>(op), in); },
              {a, b}, false, tol_for(d));
    }
    for (UnaryOp op : {UnaryOp::relu, UnaryOp::abs, UnaryOp::sign, UnaryOp::exp, UnaryOp::tanh, UnaryOp::sigmoid}) {
      INFO(unary_op_name(op) << " " << dtype_name(d));
      compare([op](const std::vector<Tensor>& in) { return dispatch1(std::make_shared<const prim::Unary>(op), in); },
              {a}, false, tol_for(d));
    }
  }
}

TEST_CASE("cuda elementwise gradients match the CPU", "[cuda][elementwise]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  // loss = sum(silu(x * w + b) * tanh(x) + gelu(x) / (1 + square(w)) - maximum(x, b) ... ) with w (C), b (1, C)
  auto loss = [](const Tensor& x, const Tensor& w, const Tensor& b) {
    Tensor h = silu(x * w + b) * tanh(x) + div(gelu(x), 1.0 + square(w)) - maximum(x, b) + where(gt(x, 0.0), exp(neg(abs(x))), sigmoid(x));
    return sum(h * sqrt(abs(x) + 1.0));
  };
  for (DType d : {DType::f64, DType::f32}) {
    for (bool nc : {false, true}) {
      INFO(dtype_name(d) << (nc ? " non-contiguous" : ""));
      Tensor x = test::random_tensor({9, 33}, d, 11), w = test::random_tensor({33}, d, 12), b = test::random_tensor({1, 33}, d, 13);
      std::vector<Tensor> grads[2];
      for (int dev = 0; dev < 2; ++dev) {
        std::vector<Tensor> in;
        for (const Tensor& t : {x, w, b}) {
          Tensor v = dev == 0 ? t.detach() : t.to(kGPU);
          if (nc && dev == 1) v = test::make_noncontiguous(v);
          v = v.detach();
          v.set_requires_grad(true);
          in.push_back(v);
        }
        Tensor l = loss(in[0], in[1], in[2]);
        grads[dev] = autograd::grad({l}, in);
      }
      for (size_t k = 0; k < 3; ++k) {
        REQUIRE(grads[1][k].device() == kGPU);
        test::require_close(grads[1][k].to(kCPU), grads[0][k], d == DType::f64 ? 1e-10 : 1e-4, d == DType::f64 ? 1e-10 : 1e-4);
      }
    }
  }
}

// Elementwise ops: every unary and binary op, comparisons and where against double-precision
// references on broadcast, 0-d, empty and non-contiguous inputs in every applicable dtype; float64
// finite-difference gradients of every differentiable op; what the vjps save; error messages.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <limits>
#include <string>

#include "autograd/node.h"
#include "core/ops/elementwise.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

enum class Domain { any, away, positive };  // where inputs are drawn: anywhere, |x| >= 0.5, x >= 0.5

struct Tol {
  DType dtype;
  double rtol, atol;
};
const Tol kFloatTols[] = {{DType::f64, 1e-12, 1e-12}, {DType::f32, 1e-5, 1e-6}, {DType::bf16, 1e-2, 1e-3},
                          {DType::f16, 2e-3, 1e-4}};
const DType kIntDtypes[] = {DType::i64, DType::i32};

Tensor make_input(const Shape& s, DType d, Domain dom, uint64_t seed, bool noncontiguous = false) {
  if (dom == Domain::any || !is_floating(d)) return test::random_tensor(s, d, seed, noncontiguous);
  Tensor t = test::random_away_from_zero(s, d, seed, dom == Domain::positive);
  return noncontiguous ? test::make_noncontiguous(t) : t;
}

// Values of `t` as doubles, broadcast (numpy rules) to `shape`, row-major.
std::vector<double> values_at(const Tensor& t, const Shape& shape) {
  std::vector<double> v;
  if (t.dtype() == DType::boolean) {
    for (bool b : t.to_vector<bool>()) v.push_back(b ? 1.0 : 0.0);
  } else {
    v = cast(t, DType::f64).to_vector<double>();
  }
  const Shape& ts = t.shape();
  const size_t lead = shape.size() - ts.size();
  std::vector<double> out(static_cast<size_t>(numel(shape)));
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t rem = static_cast<int64_t>(i), src = 0, stride = 1;
    for (size_t d = shape.size(); d-- > 0;) {
      const int64_t idx = rem % shape[d];
      rem /= shape[d];
      if (d >= lead) {
        const int64_t n = ts[d - lead];
        if (n != 1) src += idx * stride;
        stride *= n;
      }
    }
    out[i] = v[static_cast<size_t>(src)];
  }
  return out;
}

void check_values(const Tensor& out, const Shape& shape, const std::vector<double>& ref, double rtol, double atol) {
  REQUIRE(out.shape() == shape);
  test::require_close(cast(out, DType::f64), from_vector<double>(ref, shape), rtol, atol);
}

// ---- the op tables

using UnaryFn = Tensor (*)(const Tensor&);
struct UnaryCase {
  const char* name;
  UnaryFn f;
  double (*ref)(double);
  Domain domain;
  bool ints;  // also defined on integer dtypes
};

const UnaryCase kUnary[] = {
    {"neg", +[](const Tensor& x) { return neg(x); }, +[](double x) { return -x; }, Domain::any, true},
    {"abs", +[](const Tensor& x) { return kiln::abs(x); }, +[](double x) { return std::fabs(x); }, Domain::away, true},
    {"sign", +[](const Tensor& x) { return sign(x); }, +[](double x) { return double((x > 0) - (x < 0)); },
     Domain::away, true},
    {"exp", +[](const Tensor& x) { return kiln::exp(x); }, +[](double x) { return std::exp(x); }, Domain::any, false},
    {"log", +[](const Tensor& x) { return kiln::log(x); }, +[](double x) { return std::log(x); }, Domain::positive,
     false},
    {"sqrt", +[](const Tensor& x) { return kiln::sqrt(x); }, +[](double x) { return std::sqrt(x); }, Domain::positive,
     false},
    {"rsqrt", +[](const Tensor& x) { return rsqrt(x); }, +[](double x) { return 1.0 / std::sqrt(x); },
     Domain::positive, false},
    {"sin", +[](const Tensor& x) { return kiln::sin(x); }, +[](double x) { return std::sin(x); }, Domain::any, false},
    {"cos", +[](const Tensor& x) { return kiln::cos(x); }, +[](double x) { return std::cos(x); }, Domain::any, false},
    {"tanh", +[](const Tensor& x) { return kiln::tanh(x); }, +[](double x) { return std::tanh(x); }, Domain::any, false},
    {"erf", +[](const Tensor& x) { return kiln::erf(x); }, +[](double x) { return std::erf(x); }, Domain::any, false},
    {"sigmoid", +[](const Tensor& x) { return sigmoid(x); }, +[](double x) { return 1.0 / (1.0 + std::exp(-x)); },
     Domain::any, false},
    {"silu", +[](const Tensor& x) { return silu(x); }, +[](double x) { return x / (1.0 + std::exp(-x)); },
     Domain::any, false},
    {"relu", +[](const Tensor& x) { return relu(x); }, +[](double x) { return x > 0 ? x : 0.0; }, Domain::away, true},
    {"gelu", +[](const Tensor& x) { return gelu(x); },
     +[](double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }, Domain::any, false},
    {"square", +[](const Tensor& x) { return square(x); }, +[](double x) { return x * x; }, Domain::any, true},
};

using BinaryFn = Tensor (*)(const Tensor&, const Tensor&);
struct BinaryCase {
  const char* name;
  BinaryFn f;
  double (*ref)(double, double);
  Domain da, db;
  bool ints;
};

const BinaryCase kBinary[] = {
    {"add", +[](const Tensor& a, const Tensor& b) { return add(a, b); }, +[](double a, double b) { return a + b; },
     Domain::any, Domain::any, true},
    {"sub", +[](const Tensor& a, const Tensor& b) { return sub(a, b); }, +[](double a, double b) { return a - b; },
     Domain::any, Domain::any, true},
    {"mul", +[](const Tensor& a, const Tensor& b) { return mul(a, b); }, +[](double a, double b) { return a * b; },
     Domain::any, Domain::any, true},
    {"div", +[](const Tensor& a, const Tensor& b) { return div(a, b); }, +[](double a, double b) { return a / b; },
     Domain::any, Domain::away, false},
    {"pow", +[](const Tensor& a, const Tensor& b) { return kiln::pow(a, b); },
     +[](double a, double b) { return std::pow(a, b); }, Domain::positive, Domain::any, false},
    {"maximum", +[](const Tensor& a, const Tensor& b) { return maximum(a, b); },
     +[](double a, double b) { return std::max(a, b); }, Domain::any, Domain::any, true},
    {"minimum", +[](const Tensor& a, const Tensor& b) { return minimum(a, b); },
     +[](double a, double b) { return std::min(a, b); }, Domain::any, Domain::any, true},
};

const BinaryCase kCompare[] = {
    {"eq", +[](const Tensor& a, const Tensor& b) { return eq(a, b); }, +[](double a, double b) { return double(a == b); },
     Domain::any, Domain::any, true},
    {"ne", +[](const Tensor& a, const Tensor& b) { return ne(a, b); }, +[](double a, double b) { return double(a != b); },
     Domain::any, Domain::any, true},
    {"lt", +[](const Tensor& a, const Tensor& b) { return lt(a, b); }, +[](double a, double b) { return double(a < b); },
     Domain::any, Domain::any, true},
    {"le", +[](const Tensor& a, const Tensor& b) { return le(a, b); }, +[](double a, double b) { return double(a <= b); },
     Domain::any, Domain::any, true},
    {"gt", +[](const Tensor& a, const Tensor& b) { return gt(a, b); }, +[](double a, double b) { return double(a > b); },
     Domain::any, Domain::any, true},
    {"ge", +[](const Tensor& a, const Tensor& b) { return ge(a, b); }, +[](double a, double b) { return double(a >= b); },
     Domain::any, Domain::any, true},
};

struct ShapeCase {
  Shape shape;
  bool noncontiguous;
};
// (200, 331) is big enough to be split across threads
const ShapeCase kUnaryShapes[] = {{{7}, false}, {{3, 1, 5}, false}, {{}, false},        {{0, 3}, false},
                                  {{4, 5}, true}, {{2, 3, 4}, true},  {{200, 331}, false}};

struct PairCase {
  Shape a, b;
  bool noncontiguous;
};
const PairCase kPairs[] = {{{7}, {7}, false},     {{3, 1, 5}, {1, 4, 1}, false}, {{}, {2, 3}, false},
                           {{2, 3}, {}, false},   {{}, {}, false},               {{0, 3}, {1, 3}, false},
                           {{5, 1}, {5}, false},  {{4, 5}, {4, 5}, true},         {{3, 1, 5}, {4, 1}, true},
                           {{200, 331}, {200, 331}, false}, {{200, 331}, {331}, false}};

}  // namespace

TEST_CASE("unary ops match double references in every float dtype", "[elementwise]") {
  uint64_t seed = 100;
  for (const UnaryCase& c : kUnary) {
    for (const Tol& tol : kFloatTols) {
      for (const ShapeCase& s : kUnaryShapes) {
        INFO(c.name << " " << dtype_name(tol.dtype) << " " << shape_str(s.shape) << (s.noncontiguous ? " strided" : ""));
        Tensor x = make_input(s.shape, tol.dtype, c.domain, ++seed, s.noncontiguous);
        Tensor y = c.f(x);
        REQUIRE(y.dtype() == tol.dtype);
        std::vector<double> ref;
        for (double v : values_at(x, s.shape)) ref.push_back(c.ref(v));
        check_values(y, s.shape, ref, tol.rtol, tol.atol);
      }
    }
  }
}

TEST_CASE("integer unary ops are exact and float-only ops reject integers", "[elementwise]") {
  uint64_t seed = 300;
  for (const UnaryCase& c : kUnary) {
    for (DType d : kIntDtypes) {
      INFO(c.name << " " << dtype_name(d));
      Tensor x = test::random_tensor({3, 1, 5}, d, ++seed, true);
      if (!c.ints) {
        REQUIRE_THROWS_WITH(c.f(x), ContainsSubstring(std::string("[") + c.name + "]") && ContainsSubstring("cast"));
        continue;
      }
      Tensor y = c.f(x);
      REQUIRE(y.dtype() == d);
      std::vector<double> ref;
      for (double v : values_at(x, x.shape())) ref.push_back(c.ref(v));
      test::require_equal(y, from_vector<double>(ref, x.shape()));
    }
    Tensor flag = test::random_tensor({4}, DType::boolean, ++seed);
    REQUIRE_THROWS_WITH(c.f(flag), ContainsSubstring(std::string("[") + c.name + "]"));
  }
}

TEST_CASE("binary ops broadcast and match double references", "[elementwise]") {
  uint64_t seed = 500;
  for (const BinaryCase& c : kBinary) {
    for (const Tol& tol : kFloatTols) {
      for (const PairCase& p : kPairs) {
        INFO(c.name << " " << dtype_name(tol.dtype) << " " << shape_str(p.a) << " " << shape_str(p.b));
        Tensor a = make_input(p.a, tol.dtype, c.da, ++seed, p.noncontiguous);
        Tensor b = make_input(p.b, tol.dtype, c.db, ++seed, p.noncontiguous);
        Shape s = broadcast_shapes(p.a, p.b, "test");
        Tensor y = c.f(a, b);
        REQUIRE(y.dtype() == tol.dtype);
        std::vector<double> va = values_at(a, s), vb = values_at(b, s), ref;
        for (size_t i = 0; i < va.size(); ++i) ref.push_back(c.ref(va[i], vb[i]));
        check_values(y, s, ref, tol.rtol, tol.atol);
      }
    }
  }
}

TEST_CASE("integer binary ops are exact; div and pow reject integers", "[elementwise]") {
  uint64_t seed = 700;
  for (const BinaryCase& c : kBinary) {
    for (DType d : kIntDtypes) {
      INFO(c.name << " " << dtype_name(d));
      Tensor a = test::random_tensor({3, 1, 5}, d, ++seed, true);
      Tensor b = test::random_tensor({4, 1}, d, ++seed);
      if (!c.ints) {
        REQUIRE_THROWS_WITH(c.f(a, b), ContainsSubstring(std::string("[") + c.name + "]") && ContainsSubstring("cast"));
        continue;
      }
      Tensor y = c.f(a, b);
      REQUIRE(y.dtype() == d);
      std::vector<double> va = values_at(a, {3, 4, 5}), vb = values_at(b, {3, 4, 5}), ref;
      for (size_t i = 0; i < va.size(); ++i) ref.push_back(c.ref(va[i], vb[i]));
      test::require_equal(y, from_vector<double>(ref, {3, 4, 5}));
    }
  }
}

TEST_CASE("comparisons give bool in every dtype, with ties", "[elementwise]") {
  uint64_t seed = 900;
  const DType dtypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32};
  for (const BinaryCase& c : kCompare) {
    for (DType d : dtypes) {
      for (const PairCase& p : kPairs) {
        INFO(c.name << " " << dtype_name(d) << " " << shape_str(p.a) << " " << shape_str(p.b));
        // integer values in [-5, 5) so that ties are common
        Tensor a = cast(test::random_tensor(p.a, DType::i64, ++seed), d);
        Tensor b = cast(test::random_tensor(p.b, DType::i64, ++seed), d);
        if (p.noncontiguous) {
          a = test::make_noncontiguous(a);
          b = test::make_noncontiguous(b);
        }
        Shape s = broadcast_shapes(p.a, p.b, "test");
        Tensor y = c.f(a, b);
        REQUIRE(y.dtype() == DType::boolean);
        std::vector<double> va = values_at(a, s), vb = values_at(b, s), ref;
        for (size_t i = 0; i < va.size(); ++i) ref.push_back(c.ref(va[i], vb[i]));
        REQUIRE(y.shape() == s);
        test::require_equal(y, from_vector<double>(ref, s));
      }
    }
    // bool operands: eq and ne only
    Tensor a = test::random_tensor({3, 4}, DType::boolean, ++seed);
    Tensor b = test::random_tensor({4}, DType::boolean, ++seed);
    const std::string n = c.name;
    if (n == "eq" || n == "ne") {
      std::vector<double> va = values_at(a, {3, 4}), vb = values_at(b, {3, 4}), ref;
      for (size_t i = 0; i < va.size(); ++i) ref.push_back(c.ref(va[i], vb[i]));
      test::require_equal(c.f(a, b), from_vector<double>(ref, {3, 4}));
    } else {
      REQUIRE_THROWS_WITH(c.f(a, b), ContainsSubstring("[" + n + "]") && ContainsSubstring("bool"));
    }
  }
}

TEST_CASE("scalar overloads and operators keep the tensor's dtype", "[elementwise]") {
  uint64_t seed = 1100;
  for (const Tol& tol : kFloatTols) {
    INFO(dtype_name(tol.dtype));
    const Shape s{3, 1, 5};
    Tensor x = test::random_away_from_zero(s, tol.dtype, ++seed, true);  // x in [0.5, 2)
    Tensor z = test::random_tensor(s, tol.dtype, ++seed, true);
    std::vector<double> vx = values_at(x, s), vz = values_at(z, s);
    auto check = [&](const Tensor& y, double (*ref)(double, double), const std::vector<double>& v, const char* what) {
      INFO(what);
      REQUIRE(y.dtype() == tol.dtype);
      std::vector<double> r;
      for (double e : v) r.push_back(ref(e, 0.0));
      check_values(y, s, r, tol.rtol, tol.atol);
    };
    check(add(z, 2.5), +[](double a, double) { return a + 2.5; }, vz, "add");
    check(sub(z, 0.75), +[](double a, double) { return a - 0.75; }, vz, "sub");
    check(mul(z, -3.0), +[](double a, double) { return a * -3.0; }, vz, "mul");
    check(div(z, 4.0), +[](double a, double) { return a / 4.0; }, vz, "div");
    check(kiln::pow(x, 2.0), +[](double a, double) { return a * a; }, vx, "pow");
    check(kiln::pow(x, -0.5), +[](double a, double) { return 1.0 / std::sqrt(a); }, vx, "pow -0.5");
    check(maximum(z, 0.25), +[](double a, double) { return std::max(a, 0.25); }, vz, "maximum");
    check(minimum(z, 0.25), +[](double a, double) { return std::min(a, 0.25); }, vz, "minimum");
    check(-z, +[](double a, double) { return -a; }, vz, "unary -");
    check(z + 1.5, +[](double a, double) { return a + 1.5; }, vz, "t + s");
    check(1.5 + z, +[](double a, double) { return 1.5 + a; }, vz, "s + t");
    check(z - 1.5, +[](double a, double) { return a - 1.5; }, vz, "t - s");
    check(1.5 - z, +[](double a, double) { return 1.5 - a; }, vz, "s - t");
    check(z * 2.0, +[](double a, double) { return a * 2.0; }, vz, "t * s");
    check(2.0 * z, +[](double a, double) { return 2.0 * a; }, vz, "s * t");
    check(z / 2.0, +[](double a, double) { return a / 2.0; }, vz, "t / s");
    check(2.0 / x, +[](double a, double) { return 2.0 / a; }, vx, "s / t");
  }
}

TEST_CASE("tensor operators and scalar comparisons", "[elementwise]") {
  Tensor a = test::random_tensor({3, 1, 5}, DType::f32, 1200, true);
  Tensor b = test::random_away_from_zero({4, 1}, DType::f32, 1201);
  const Shape s{3, 4, 5};
  std::vector<double> va = values_at(a, s), vb = values_at(b, s), r_add, r_sub, r_mul, r_div;
  for (size_t i = 0; i < va.size(); ++i) {
    r_add.push_back(va[i] + vb[i]);
    r_sub.push_back(va[i] - vb[i]);
    r_mul.push_back(va[i] * vb[i]);
    r_div.push_back(va[i] / vb[i]);
  }
  check_values(a + b, s, r_add, 1e-6, 1e-6);
  check_values(a - b, s, r_sub, 1e-6, 1e-6);
  check_values(a * b, s, r_mul, 1e-6, 1e-6);
  check_values(a / b, s, r_div, 1e-6, 1e-6);

  Tensor n = from_vector<int64_t>({-2, 0, 1, 3}, {4});
  test::require_equal(eq(n, 1.0), from_vector<double>({0, 0, 1, 0}, {4}));
  test::require_equal(ne(n, 1.0), from_vector<double>({1, 1, 0, 1}, {4}));
  test::require_equal(lt(n, 1.0), from_vector<double>({1, 1, 0, 0}, {4}));
  test::require_equal(le(n, 1.0), from_vector<double>({1, 1, 1, 0}, {4}));
  test::require_equal(gt(n, 1.0), from_vector<double>({0, 0, 0, 1}, {4}));
  test::require_equal(ge(n, 1.0), from_vector<double>({0, 0, 1, 1}, {4}));
  test::require_equal(add(n, 2.0) * 3.0, from_vector<double>({0, 6, 9, 15}, {4}));
  REQUIRE(ge(n, 1.0).dtype() == DType::boolean);
}

TEST_CASE("maximum and minimum propagate NaN; relu keeps it", "[elementwise]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor a = from_vector<float>({nan, 1.0f, 2.0f}, {3});
  Tensor b = from_vector<float>({0.0f, nan, 3.0f}, {3});
  for (const Tensor& y : {maximum(a, b), minimum(a, b)}) {
    std::vector<float> v = y.to_vector<float>();
    REQUIRE(std::isnan(v[0]));
    REQUIRE(std::isnan(v[1]));
  }
  REQUIRE(maximum(a, b).to_vector<float>()[2] == 3.0f);
  REQUIRE(minimum(a, b).to_vector<float>()[2] == 2.0f);
  REQUIRE(std::isnan(relu(a).to_vector<float>()[0]));
}

TEST_CASE("where selects with a broadcast bool condition in every dtype", "[elementwise]") {
  uint64_t seed = 1300;
  const DType dtypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::boolean};
  struct Triple {
    Shape c, a, b;
    bool noncontiguous;
  };
  const Triple triples[] = {{{3, 1, 5}, {1, 4, 1}, {5}, false}, {{4, 5}, {4, 5}, {4, 5}, true},
                            {{}, {2, 3}, {}, false},             {{0, 1}, {1, 3}, {3}, false},
                            {{2, 1}, {}, {}, false},             {{3, 4, 5}, {4, 5}, {3, 1, 1}, true}};
  for (DType d : dtypes) {
    for (const Triple& t : triples) {
      INFO(dtype_name(d) << " " << shape_str(t.c) << " " << shape_str(t.a) << " " << shape_str(t.b));
      Tensor c = test::random_tensor(t.c, DType::boolean, ++seed, t.noncontiguous);
      Tensor a = test::random_tensor(t.a, d, ++seed, t.noncontiguous);
      Tensor b = test::random_tensor(t.b, d, ++seed, t.noncontiguous);
      Shape s = broadcast_shapes(broadcast_shapes(t.c, t.a, "test"), t.b, "test");
      Tensor y = where(c, a, b);
      REQUIRE(y.dtype() == d);
      REQUIRE(y.shape() == s);
      std::vector<double> vc = values_at(c, s), va = values_at(a, s), vb = values_at(b, s), ref;
      for (size_t i = 0; i < vc.size(); ++i) ref.push_back(vc[i] != 0 ? va[i] : vb[i]);
      test::require_equal(y, from_vector<double>(ref, s));
    }
  }
}

TEST_CASE("unary gradients match finite differences in f64", "[elementwise]") {
  uint64_t seed = 1500;
  for (const UnaryCase& c : kUnary) {
    INFO(c.name);
    for (const Shape& s : {Shape{3, 4}, Shape{}}) {
      Tensor x = make_input(s, DType::f64, c.domain, ++seed);
      x.set_requires_grad();
      UnaryFn f = c.f;
      test::check_gradients([f](const std::vector<Tensor>& in) { return f(in[0]); }, {x});
    }
  }
}

TEST_CASE("binary and where gradients match finite differences, with broadcasting", "[elementwise]") {
  uint64_t seed = 1700;
  const PairCase pairs[] = {{{3, 4}, {3, 4}, false}, {{3, 1, 5}, {1, 4, 1}, false}, {{2, 3}, {}, false},
                            {{}, {4}, false},        {{5, 1}, {5}, false}};
  for (const BinaryCase& c : kBinary) {
    for (const PairCase& p : pairs) {
      INFO(c.name << " " << shape_str(p.a) << " " << shape_str(p.b));
      Tensor a = make_input(p.a, DType::f64, c.da, ++seed);
      Tensor b = make_input(p.b, DType::f64, c.db, ++seed);
      a.set_requires_grad();
      b.set_requires_grad();
      BinaryFn f = c.f;
      test::check_gradients([f](const std::vector<Tensor>& in) { return f(in[0], in[1]); }, {a, b});
    }
  }
  Tensor c = test::random_tensor({3, 1, 5}, DType::boolean, ++seed);
  Tensor a = test::random_tensor({1, 4, 1}, DType::f64, ++seed);
  Tensor b = test::random_tensor({5}, DType::f64, ++seed);
  a.set_requires_grad();
  b.set_requires_grad();
  test::check_gradients([c](const std::vector<Tensor>& in) { return where(c, in[0], in[1]); }, {a, b});
  // scalar overloads and operators, one operand requiring grad
  Tensor x = test::random_away_from_zero({2, 3}, DType::f64, ++seed, true);
  x.set_requires_grad();
  test::check_gradients(
      [](const std::vector<Tensor>& in) { return 2.0 / in[0] - kiln::pow(in[0], 1.5) * 3.0 + (1.0 - in[0]) / 4.0; },
      {x});
}

TEST_CASE("maximum and minimum split tied gradients half and half", "[elementwise]") {
  Tensor a = from_vector<double>({1.0, 2.0, 3.0}, {3});
  Tensor b = from_vector<double>({1.0, 5.0, 0.0}, {3});
  a.set_requires_grad();
  b.set_requires_grad();
  sum(maximum(a, b)).backward();
  test::require_close(a.grad(), from_vector<double>({0.5, 0.0, 1.0}, {3}));
  test::require_close(b.grad(), from_vector<double>({0.5, 1.0, 0.0}, {3}));
  a.zero_grad();
  b.zero_grad();
  sum(minimum(a, b)).backward();
  test::require_close(a.grad(), from_vector<double>({0.5, 1.0, 0.0}, {3}));
  test::require_close(b.grad(), from_vector<double>({0.5, 0.0, 1.0}, {3}));
}

TEST_CASE("vjps save only what they read", "[elementwise]") {
  Tensor a = test::random_tensor({3, 1}, DType::f64, 1900);
  Tensor b = test::random_away_from_zero({4}, DType::f64, 1901, true);
  a.set_requires_grad();
  b.set_requires_grad();
  auto saved = [](const Tensor& y) { return std::pair{y.grad_fn()->saved_inputs.size(), y.grad_fn()->saved_outputs.size()}; };
  REQUIRE(saved(a + b) == std::pair<size_t, size_t>{0, 0});
  REQUIRE(saved(a - b) == std::pair<size_t, size_t>{0, 0});
  REQUIRE(saved(neg(a)) == std::pair<size_t, size_t>{0, 0});
  REQUIRE(saved(kiln::exp(a)) == std::pair<size_t, size_t>{0, 1});
  REQUIRE(saved(kiln::log(b)) == std::pair<size_t, size_t>{1, 0});
  REQUIRE(saved(a * b) == std::pair<size_t, size_t>{2, 0});
  REQUIRE(saved(kiln::pow(b, a)) == std::pair<size_t, size_t>{2, 1});
  // add of broadcast operands still reduces gradients to each input's shape
  sum(a + b).backward();
  test::require_close(a.grad(), full({3, 1}, 4.0, DType::f64));
  test::require_close(b.grad(), full({4}, 3.0, DType::f64));
}

TEST_CASE("elementwise vjps are differentiable again (create_graph)", "[elementwise]") {
  // d/dx sum(d/dx sum(tanh x)) = sum of -2 tanh(x) (1 - tanh(x)^2)
  Tensor x = test::random_tensor({5}, DType::f64, 1902);
  x.set_requires_grad();
  Tensor g = autograd::grad({sum(kiln::tanh(x))}, {x}, {}, false, true)[0];
  Tensor gg = autograd::grad({sum(g)}, {x})[0];
  std::vector<double> ref;
  for (double v : x.to_vector<double>()) ref.push_back(-2.0 * std::tanh(v) * (1.0 - std::tanh(v) * std::tanh(v)));
  test::require_close(gg, from_vector<double>(ref, {5}), 1e-10, 1e-12);
}

TEST_CASE("elementwise errors name the op", "[elementwise]") {
  Tensor f = test::random_tensor({3}, DType::f32, 2000);
  Tensor h = test::random_tensor({3}, DType::bf16, 2001);
  Tensor i = test::random_tensor({3}, DType::i64, 2002);
  Tensor c = test::random_tensor({3}, DType::boolean, 2003);
  REQUIRE_THROWS_AS(add(f, h), kiln::Error);
  REQUIRE_THROWS_WITH(add(f, h), ContainsSubstring("[add] dtype mismatch: f32 and bf16"));
  REQUIRE_THROWS_WITH(mul(i, f), ContainsSubstring("[mul] dtype mismatch"));
  REQUIRE_THROWS_WITH(add(f, test::random_tensor({4}, DType::f32, 2004)), ContainsSubstring("[add]"));
  REQUIRE_THROWS_WITH(maximum(test::random_tensor({2, 3}, DType::f32, 2005), test::random_tensor({3, 2}, DType::f32, 2006)),
                      ContainsSubstring("[maximum]"));
  REQUIRE_THROWS_WITH(div(i, i), ContainsSubstring("[div]") && ContainsSubstring("cast"));
  REQUIRE_THROWS_WITH(kiln::pow(i, 2.0), ContainsSubstring("[pow]"));
  REQUIRE_THROWS_WITH(kiln::exp(i), ContainsSubstring("[exp]"));
  REQUIRE_THROWS_WITH(kiln::sqrt(c), ContainsSubstring("[sqrt]"));
  REQUIRE_THROWS_WITH(add(c, c), ContainsSubstring("[add]") && ContainsSubstring("bool"));
  REQUIRE_THROWS_WITH(gt(c, 0.0), ContainsSubstring("[gt]"));
  REQUIRE_THROWS_WITH(where(f, f, f), ContainsSubstring("[where] condition must be bool"));
  REQUIRE_THROWS_WITH(where(c, f, h), ContainsSubstring("[where] dtype mismatch"));
  REQUIRE_THROWS_WITH(where(c, f, test::random_tensor({2}, DType::f32, 2007)), ContainsSubstring("[where]"));
  REQUIRE_THROWS_WITH(add(Tensor(), f), ContainsSubstring("[add]"));
  REQUIRE_THROWS_WITH(mul(Tensor(), 2.0), ContainsSubstring("[mul]"));
  REQUIRE_THROWS_AS(neg(Tensor()), kiln::Error);
}

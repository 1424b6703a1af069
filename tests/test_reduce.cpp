// Reductions: sum/mean/amax/amin/argmax/logsumexp/softmax/log_softmax against double-loop references
// over dim subsets (negative dims, keepdim, 0-d, size-1 and non-contiguous inputs) in every dtype;
// long rows and the split/column kernel paths; -inf/NaN/empty rules; f64 gradients; errors.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "autograd/node.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Tol {
  DType dtype;
  double rtol, atol;
};
const Tol kFloatTols[] = {{DType::f64, 1e-12, 1e-12}, {DType::f32, 1e-5, 1e-6}, {DType::bf16, 1e-2, 1e-4},
                          {DType::f16, 2e-3, 1e-5}};

struct DimsCase {
  Shape shape;
  std::vector<int64_t> dims;
};
const DimsCase kDimsCases[] = {
    {{}, {}},          {{}, {0}},           {{1}, {}},           {{1}, {-1}},         {{7}, {0}},
    {{3, 1, 7}, {}},   {{3, 1, 7}, {1}},    {{3, 1, 7}, {-1}},   {{3, 1, 7}, {0, -1}}, {{2, 5, 3, 4}, {0, 2}},
    {{2, 5, 3, 4}, {-3, -1}}, {{2, 5, 3, 4}, {3}}, {{2, 5, 3, 4}, {0}}, {{2, 5, 3, 4}, {}}, {{4, 9}, {0}},
};

// Row-major values of any tensor as doubles.
std::vector<double> values(const Tensor& t) {
  if (t.dtype() == DType::boolean) {
    std::vector<bool> b = t.to_vector<bool>();
    return std::vector<double>(b.begin(), b.end());
  }
  return cast(t, DType::f64).to_vector<double>();
}

// Sorted non-negative dims; empty = all; none for a 0-d shape.
std::vector<int64_t> wrap(const std::vector<int64_t>& dims, size_t nd) {
  std::vector<int64_t> out;
  if (nd == 0) return out;
  if (dims.empty()) {
    for (size_t d = 0; d < nd; ++d) out.push_back(static_cast<int64_t>(d));
  }
  for (int64_t d : dims) out.push_back(d < 0 ? d + static_cast<int64_t>(nd) : d);
  std::sort(out.begin(), out.end());
  return out;
}

// The reduction's grouping: which output each input element (row-major) goes to, and the output shape.
struct Groups {
  std::vector<size_t> of;  // per input element
  size_t count = 1;
  Shape out_shape;
};

Groups group(const Shape& shape, const std::vector<int64_t>& dims, bool keepdim) {
  Groups g;
  std::vector<bool> red(shape.size(), false);
  for (int64_t d : dims) red[static_cast<size_t>(d)] = true;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (!red[d]) g.count *= static_cast<size_t>(shape[d]);
    if (!red[d] || keepdim) g.out_shape.push_back(red[d] ? 1 : shape[d]);
  }
  const size_t n = static_cast<size_t>(numel(shape));
  g.of.resize(n);
  for (size_t i = 0; i < n; ++i) {
    size_t rem = i, out = 0, stride = 1;
    for (size_t d = shape.size(); d-- > 0;) {
      const size_t idx = rem % static_cast<size_t>(shape[d]);
      rem /= static_cast<size_t>(shape[d]);
      if (!red[d]) {
        out += idx * stride;
        stride *= static_cast<size_t>(shape[d]);
      }
    }
    g.of[i] = out;
  }
  return g;
}

using RowFn = std::function<double(const std::vector<double>&)>;

// fn applied to each output's reduced values (in row-major order); the result as an f64 tensor.
Tensor reference(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim, const RowFn& fn) {
  const Groups g = group(x.shape(), wrap(dims, x.shape().size()), keepdim);
  const std::vector<double> v = values(x);
  std::vector<std::vector<double>> rows(g.count);
  for (size_t i = 0; i < v.size(); ++i) rows[g.of[i]].push_back(v[i]);
  std::vector<double> out;
  for (const auto& r : rows) out.push_back(fn(r));
  return from_vector<double>(out, g.out_shape);
}

double ref_sum(const std::vector<double>& r) {
  double s = 0;
  for (double v : r) s += v;
  return s;
}
double ref_mean(const std::vector<double>& r) { return ref_sum(r) / static_cast<double>(r.size()); }
double ref_max(const std::vector<double>& r) { return *std::max_element(r.begin(), r.end()); }
double ref_min(const std::vector<double>& r) { return *std::min_element(r.begin(), r.end()); }
double ref_argmax(const std::vector<double>& r) {
  return static_cast<double>(std::max_element(r.begin(), r.end()) - r.begin());  // first maximum
}
double ref_logsumexp(const std::vector<double>& r) {
  const double m = r.empty() ? -kInf : ref_max(r);
  if (!std::isfinite(m)) return m;
  double s = 0;
  for (double v : r) s += std::exp(v - m);
  return m + std::log(s);
}

// softmax / log_softmax along `dim` in double.
Tensor ref_softmax(const Tensor& x, int64_t dim, bool log) {
  const Groups g = group(x.shape(), wrap({dim}, x.shape().size()), true);
  const std::vector<double> v = values(x);
  std::vector<std::vector<double>> rows(g.count);
  for (size_t i = 0; i < v.size(); ++i) rows[g.of[i]].push_back(v[i]);
  std::vector<double> lse;
  for (const auto& r : rows) lse.push_back(ref_logsumexp(r));
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double l = v[i] - lse[g.of[i]];
    out[i] = log ? l : std::exp(l);
  }
  return from_vector<double>(out, x.shape());
}

void check(const Tensor& out, const Tensor& ref, DType dtype, double rtol, double atol) {
  REQUIRE(out.dtype() == dtype);
  REQUIRE(out.shape() == ref.shape());
  test::require_close(cast(out, DType::f64), ref, rtol, atol);
}

}  // namespace

TEST_CASE("sum, mean, amax and amin match double references over dim subsets", "[reduce]") {
  uint64_t seed = 1;
  for (const Tol& tol : kFloatTols) {
    for (const DimsCase& c : kDimsCases) {
      for (bool noncontig : {false, true}) {
        for (bool keepdim : {false, true}) {
          INFO(dtype_name(tol.dtype) << " shape " << shape_str(c.shape) << " dims [" << fmt::format("{}", fmt::join(c.dims, ", "))
                                     << "] keepdim " << keepdim << " noncontiguous " << noncontig);
          Tensor x = test::random_tensor(c.shape, tol.dtype, seed++, noncontig);
          check(sum(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_sum), tol.dtype, tol.rtol, tol.atol);
          check(mean(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_mean), tol.dtype, tol.rtol, tol.atol);
          // extrema are exact in every dtype
          check(amax(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_max), tol.dtype, 0, 0);
          check(amin(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_min), tol.dtype, 0, 0);
        }
      }
    }
  }
  // Tensor methods are the same ops
  Tensor x = test::random_tensor({3, 4}, DType::f64, 99);
  test::require_equal(x.sum({1}, true), sum(x, {1}, true));
  test::require_equal(x.mean(), mean(x));
}

TEST_CASE("integer and bool sums give i64; extrema keep the dtype and are exact", "[reduce]") {
  uint64_t seed = 100;
  for (DType d : {DType::i64, DType::i32, DType::u8, DType::boolean}) {
    for (const DimsCase& c : kDimsCases) {
      for (bool keepdim : {false, true}) {
        INFO(dtype_name(d) << " shape " << shape_str(c.shape) << " keepdim " << keepdim);
        const bool noncontig = seed % 2 == 0;
        Tensor x = test::random_tensor(c.shape, d, seed++, noncontig);
        check(sum(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_sum), DType::i64, 0, 0);
        check(amax(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_max), d, 0, 0);
        check(amin(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_min), d, 0, 0);
      }
    }
  }
  // i64 sums are exact beyond the range of doubles' integers
  Tensor big = from_vector<int64_t>({(int64_t{1} << 62) + 1, 3, -1}, {3});
  REQUIRE(sum(big).item<int64_t>() == (int64_t{1} << 62) + 3);
}

TEST_CASE("argmax gives the first maximum as i64 in every dtype", "[reduce]") {
  uint64_t seed = 200;
  const DType dtypes[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean};
  const std::pair<Shape, int64_t> cases[] = {{{}, 0},        {{1}, 0},        {{7}, -1},       {{3, 1, 7}, 1},
                                             {{3, 1, 7}, -1}, {{2, 5, 3, 4}, 0}, {{2, 5, 3, 4}, -2}, {{2, 5, 3, 4}, 3}};
  for (DType d : dtypes) {
    for (const auto& [shape, dim] : cases) {
      for (bool keepdim : {false, true}) {
        INFO(dtype_name(d) << " shape " << shape_str(shape) << " dim " << dim << " keepdim " << keepdim);
        const bool noncontig = seed % 2 == 0;
        Tensor x = test::random_tensor(shape, d, seed++, noncontig);
        const std::vector<int64_t> dims = shape.empty() ? std::vector<int64_t>{} : std::vector<int64_t>{dim};
        check(argmax(x, dim, keepdim), reference(x, dims, keepdim, ref_argmax), DType::i64, 0, 0);
      }
    }
  }
  // ties pick the first; NaN counts as the maximum; -inf rows give index 0
  Tensor t = from_vector<double>({1, 3, 3, 2, -kInf, -kInf, -kInf, -kInf, 1, kNaN, 5, kNaN}, {3, 4});
  test::require_equal(argmax(t, 1), from_vector<int64_t>({1, 0, 1}, {3}));
  Tensor ti = from_vector<int64_t>({4, 9, 9, 9, 2, 9}, {3, 2});
  test::require_equal(argmax(ti, 0, true), from_vector<int64_t>({1, 0}, {1, 2}));
  REQUIRE(argmax(ti, 0).dtype() == DType::i64);
  // the same on long contiguous rows (the vectorised path) and across chunks
  for (int64_t n : {100, 40000}) {
    std::vector<float> row(static_cast<size_t>(n), -1.0f);
    row[37] = row[static_cast<size_t>(n - 20)] = 5.0f;
    REQUIRE(argmax(from_vector<float>(row, {1, n}), 1).item<int64_t>() == 37);
    row[static_cast<size_t>(n - 10)] = static_cast<float>(kNaN);
    REQUIRE(argmax(from_vector<float>(row, {n}), 0).item<int64_t>() == n - 10);
  }
}

TEST_CASE("logsumexp matches a double reference over dim subsets", "[reduce]") {
  uint64_t seed = 300;
  for (const Tol& tol : kFloatTols) {
    for (const DimsCase& c : kDimsCases) {
      for (bool noncontig : {false, true}) {
        for (bool keepdim : {false, true}) {
          INFO(dtype_name(tol.dtype) << " shape " << shape_str(c.shape) << " keepdim " << keepdim);
          Tensor x = test::random_tensor(c.shape, tol.dtype, seed++, noncontig);
          check(logsumexp(x, c.dims, keepdim), reference(x, c.dims, keepdim, ref_logsumexp), tol.dtype, tol.rtol,
                tol.atol);
        }
      }
    }
  }
}

TEST_CASE("softmax and log_softmax match double references along every dim", "[reduce]") {
  uint64_t seed = 400;
  const Shape shapes[] = {{}, {1}, {7}, {3, 1, 7}, {2, 5, 3, 4}};
  for (const Tol& tol : kFloatTols) {
    for (const Shape& shape : shapes) {
      const int64_t nd = static_cast<int64_t>(shape.size());
      for (int64_t dim = -std::max<int64_t>(nd, 1); dim < std::max<int64_t>(nd, 1); ++dim) {
        for (bool noncontig : {false, true}) {
          INFO(dtype_name(tol.dtype) << " shape " << shape_str(shape) << " dim " << dim << " noncontiguous " << noncontig);
          Tensor x = test::random_tensor(shape, tol.dtype, seed++, noncontig);
          check(softmax(x, dim), ref_softmax(x, dim, false), tol.dtype, tol.rtol, tol.atol);
          check(log_softmax(x, dim), ref_softmax(x, dim, true), tol.dtype, tol.rtol, tol.atol);
        }
      }
    }
  }
}

TEST_CASE("long rows: stable softmax near 1e4, split reductions and the column path", "[reduce]") {
  // values around 1e4: exp would overflow without subtracting the maximum
  for (const Shape& shape : {Shape{3, 70001}, Shape{1, 131072}}) {
    INFO("shape " << shape_str(shape));
    Tensor x = add(mul(test::random_tensor(shape, DType::f32, 500), 4.0), 1e4);
    check(softmax(x, -1), ref_softmax(x, -1, false), DType::f32, 1e-4, 1e-9);
    check(log_softmax(x, 1), ref_softmax(x, 1, true), DType::f32, 1e-5, 2e-4);
    check(logsumexp(x, {-1}), reference(x, {-1}, false, ref_logsumexp), DType::f32, 1e-6, 0);
    check(argmax(x, 1), reference(x, {1}, false, ref_argmax), DType::i64, 0, 0);
    check(amax(x, {1}), reference(x, {1}, false, ref_max), DType::f32, 0, 0);
    // the sum of 1e5 f32 values is accumulated in double: only the final rounding is lost
    check(sum(x, {1}), reference(x, {1}, false, ref_sum), DType::f32, 1e-7, 0);
    Tensor s = softmax(x, -1);
    check(sum(s, {-1}), reference(s, {-1}, false, ref_sum), DType::f32, 1e-6, 0);
    // a big row along a non-last dim (strided rows)
    Tensor xt = x.t();
    check(softmax(xt, 0), ref_softmax(xt, 0, false), DType::f32, 1e-4, 1e-9);
    check(logsumexp(xt, {0}, true), reference(xt, {0}, true, ref_logsumexp), DType::f32, 1e-6, 0);
  }
  // a whole-tensor sum of ~2.6e5 bf16 values, rounded once
  Tensor b = test::random_tensor({257, 1023}, DType::bf16, 501);
  check(sum(b), reference(b, {}, false, ref_sum), DType::bf16, 4e-3, 0);
  check(mean(b, {0, 1}), reference(b, {}, false, ref_mean), DType::bf16, 4e-3, 0);
  // reduced dims strided, kept dim contiguous (bias-gradient shape): the column path, short and long
  uint64_t seed = 510;
  const std::pair<Shape, std::vector<int64_t>> column_cases[] = {
      {{300, 37}, {0}}, {{20000, 9}, {0}}, {{6, 5, 600}, {0, 1}}, {{4, 3, 300}, {1}}};
  for (const auto& [shape, dims] : column_cases) {
    for (const Tol& tol : kFloatTols) {
      INFO(dtype_name(tol.dtype) << " shape " << shape_str(shape));
      Tensor x = test::random_tensor(shape, tol.dtype, seed++);
      check(sum(x, dims), reference(x, dims, false, ref_sum), tol.dtype, tol.rtol, tol.atol);
      check(mean(x, dims, true), reference(x, dims, true, ref_mean), tol.dtype, tol.rtol, tol.atol);
      check(amax(x, dims), reference(x, dims, false, ref_max), tol.dtype, 0, 0);
      check(amin(x, dims), reference(x, dims, false, ref_min), tol.dtype, 0, 0);
    }
    if (shape.size() == 2) {  // softmax, logsumexp and argmax down the columns too
      Tensor x = test::random_tensor(shape, DType::f32, seed++);
      check(softmax(x, 0), ref_softmax(x, 0, false), DType::f32, 1e-5, 1e-9);
      check(log_softmax(x, 0), ref_softmax(x, 0, true), DType::f32, 1e-5, 1e-6);
      check(logsumexp(x, {0}), reference(x, {0}, false, ref_logsumexp), DType::f32, 1e-6, 0);
      check(argmax(x, 0), reference(x, {0}, false, ref_argmax), DType::i64, 0, 0);
    }
    Tensor xi = test::random_tensor(shape, DType::i32, seed++);
    check(sum(xi, dims), reference(xi, dims, false, ref_sum), DType::i64, 0, 0);
    Tensor xt = test::random_tensor(Shape(shape.rbegin(), shape.rend()), DType::f64, seed++).permute(
        shape.size() == 2 ? std::vector<int64_t>{1, 0} : std::vector<int64_t>{2, 1, 0});  // transposed layout
    check(sum(xt, dims), reference(xt, dims, false, ref_sum), DType::f64, 1e-12, 1e-12);
  }
  // broadcast (stride-0) inputs
  Tensor e = expand(test::random_tensor({1, 5}, DType::f64, 520), {4000, 5});
  check(sum(e, {0}), reference(e, {0}, false, ref_sum), DType::f64, 1e-12, 1e-12);
  check(softmax(e, 0), ref_softmax(e, 0, false), DType::f64, 1e-12, 1e-15);
}

TEST_CASE("infinities, NaN and empty reductions follow the documented rules", "[reduce]") {
  for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    INFO(dtype_name(d));
    // rows: all -inf; one +inf; a NaN; finite with a -inf
    Tensor x = cast(from_vector<double>({-kInf, -kInf, -kInf, 1, kInf, 2, 1, kNaN, 3, 0, -kInf, 0}, {4, 3}), d);
    check(logsumexp(x, {1}), from_vector<double>({-kInf, kInf, kNaN, std::log(2.0)}, {4}), d, 1e-2, 0);
    check(softmax(x, 1), from_vector<double>({0, 0, 0, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, 0.5, 0, 0.5}, {4, 3}), d,
          1e-3, 0);
    check(log_softmax(x, 1),
          from_vector<double>({-kInf, -kInf, -kInf, kNaN, kNaN, kNaN, kNaN, kNaN, kNaN, -std::log(2.0), -kInf,
                               -std::log(2.0)},
                              {4, 3}),
          d, 1e-2, 0);
    test::require_equal(amax(x, {1}), from_vector<double>({-kInf, kInf, kNaN, 0}, {4}));
    test::require_equal(amin(x, {1}), from_vector<double>({-kInf, 1, kNaN, -kInf}, {4}));
  }
  // empty reductions: sum 0, mean NaN, logsumexp -inf; empty outputs are fine
  Tensor z = zeros({0, 3}, DType::f32);
  test::require_equal(sum(z, {0}), zeros({3}, DType::f32));
  test::require_equal(sum(z), scalar_tensor(0.0, DType::f32));
  test::require_equal(sum(zeros({0}, DType::i32)), scalar_tensor(0.0, DType::i64));
  test::require_equal(mean(z, {0}, true), full({1, 3}, kNaN, DType::f32));
  test::require_equal(logsumexp(z, {0}), full({3}, -kInf, DType::f32));
  REQUIRE(amax(z, {1}).shape() == Shape{0});
  REQUIRE(argmax(z, 1).shape() == Shape{0});
  REQUIRE(softmax(z, 0).shape() == Shape{0, 3});
  REQUIRE(log_softmax(z, 1).shape() == Shape{0, 3});
}

TEST_CASE("reduction gradients match finite differences in f64", "[reduce]") {
  uint64_t seed = 600;
  const std::pair<Shape, std::vector<int64_t>> cases[] = {
      {{}, {}}, {{1}, {}}, {{3, 1, 7}, {-1}}, {{3, 1, 7}, {0, 1}}, {{2, 5, 3, 4}, {0, 2}}, {{2, 5, 3, 4}, {}}};
  for (const auto& [shape, dims] : cases) {
    for (bool keepdim : {false, true}) {
      for (bool noncontig : {false, true}) {
        INFO("shape " << shape_str(shape) << " keepdim " << keepdim << " noncontiguous " << noncontig);
        Tensor x = test::random_tensor(shape, DType::f64, seed++, noncontig).set_requires_grad();
        const auto d = dims;
        const bool k = keepdim;
        test::check_gradients([d, k](const std::vector<Tensor>& in) { return sum(in[0], d, k); }, {x});
        test::check_gradients([d, k](const std::vector<Tensor>& in) { return mean(in[0], d, k); }, {x});
        test::check_gradients([d, k](const std::vector<Tensor>& in) { return amax(in[0], d, k); }, {x});
        test::check_gradients([d, k](const std::vector<Tensor>& in) { return amin(in[0], d, k); }, {x});
        test::check_gradients([d, k](const std::vector<Tensor>& in) { return logsumexp(in[0], d, k); }, {x});
      }
    }
  }
  const std::pair<Shape, int64_t> rows[] = {{{}, 0}, {{1}, 0}, {{7}, -1}, {{3, 1, 7}, 0}, {{2, 5, 3, 4}, -2}, {{2, 5, 3, 4}, 3}};
  for (const auto& [shape, dim] : rows) {
    for (bool noncontig : {false, true}) {
      INFO("shape " << shape_str(shape) << " dim " << dim << " noncontiguous " << noncontig);
      Tensor x = test::random_tensor(shape, DType::f64, seed++, noncontig).set_requires_grad();
      const int64_t dd = dim;
      test::check_gradients([dd](const std::vector<Tensor>& in) { return softmax(in[0], dd); }, {x});
      test::check_gradients([dd](const std::vector<Tensor>& in) { return log_softmax(in[0], dd); }, {x});
    }
  }
}

TEST_CASE("amax and amin share the gradient evenly among tied extrema", "[reduce]") {
  // two-way ties: central differences see exactly half on each side
  Tensor x = from_vector<double>({1, 4, 4, -2, 0.5, -2, 3, 3, -7, -7, 0.25, 2}, {3, 4}).set_requires_grad();
  test::check_gradients([](const std::vector<Tensor>& in) { return amax(in[0], {1}); }, {x});
  test::check_gradients([](const std::vector<Tensor>& in) { return amin(in[0], {0, 1}); }, {x});
  test::check_gradients([](const std::vector<Tensor>& in) { return amax(in[0], {0}, true); }, {x});
  // a three-way tie gets a third each, scaled by the incoming gradient
  Tensor t = from_vector<double>({5, 5, 1, 5, 2, 2}, {2, 3}).set_requires_grad();
  Tensor y = amax(t, {});
  mul(y, 6.0).backward();
  test::require_close(t.grad(), from_vector<double>({2, 2, 0, 2, 0, 0}, {2, 3}), 1e-15, 0);
  Tensor u = from_vector<double>({5, 5, 1, 2, 2, 2}, {2, 3}).set_requires_grad();
  sum(mul(amin(u, {1}, true), from_vector<double>({1, 3}, {2, 1}))).backward();
  test::require_close(u.grad(), from_vector<double>({0, 0, 1, 1, 1, 1}, {2, 3}), 1e-15, 0);
}

TEST_CASE("gradients stay NaN-free on all -inf rows", "[reduce]") {
  Tensor x = from_vector<double>({-kInf, -kInf, -kInf, 0.5, -1, 2}, {2, 3}).set_requires_grad();
  Tensor l = logsumexp(x, {1});
  sum(mul(l, from_vector<double>({0, 1}, {2}))).backward();
  const std::vector<double> g = x.grad().to_vector<double>();
  for (double v : g) REQUIRE(std::isfinite(v));
  test::require_close(x.grad(), cast(mul(softmax(x.detach(), 1), from_vector<double>({0, 1}, {2, 1})), DType::f64),
                      1e-15, 0);
  // softmax of an all -inf row is 0 and passes no gradient; log_softmax passes g through
  Tensor y = from_vector<double>({-kInf, -kInf, 1, 2}, {2, 2}).set_requires_grad();
  sum(mul(softmax(y, 1), from_vector<double>({1, 2, 3, 4}, {2, 2}))).backward();
  for (double v : y.grad().to_vector<double>()) REQUIRE(std::isfinite(v));
  REQUIRE(y.grad().to_vector<double>()[0] == 0.0);
}

TEST_CASE("reduction vjps save only what they read; argmax records no gradient", "[reduce]") {
  Tensor x = test::random_tensor({3, 4}, DType::f64, 700).set_requires_grad();
  Tensor s = sum(x, {1});
  REQUIRE(s.grad_fn()->saved_inputs.empty());
  REQUIRE(s.grad_fn()->saved_outputs.empty());
  REQUIRE(mean(x).grad_fn()->saved_inputs.empty());
  Tensor m = amax(x, {0});
  REQUIRE(m.grad_fn()->saved_inputs.size() == 1);
  REQUIRE(m.grad_fn()->saved_outputs.size() == 1);
  Tensor p = softmax(x, 1);
  REQUIRE(p.grad_fn()->saved_inputs.empty());
  REQUIRE(p.grad_fn()->saved_outputs.size() == 1);
  Tensor a = argmax(x, 1);
  REQUIRE_FALSE(a.requires_grad());
}

TEST_CASE("reduction vjps are differentiable again (create_graph)", "[reduce]") {
  // f(x) = d<op(x), x*x>/dx, itself checked against finite differences
  using Op = std::function<Tensor(const Tensor&)>;
  const Op ops[] = {[](const Tensor& x) { return softmax(x, 1); }, [](const Tensor& x) { return log_softmax(x, 0); },
                    [](const Tensor& x) { return logsumexp(x, {1}, true); },
                    [](const Tensor& x) { return mean(x, {0}, true); }};
  uint64_t seed = 710;
  for (const Op& op : ops) {
    Tensor v = test::random_tensor({3, 4}, DType::f64, seed++).set_requires_grad();
    test::check_gradients(
        [op](const std::vector<Tensor>& in) {
          autograd::EnableGradGuard grad_on;
          Tensor x = in[0];
          if (!x.requires_grad()) x = x.detach().set_requires_grad();
          Tensor y = op(x);
          return autograd::grad({y}, {x}, {mul(x, x).sum({}, false) * ones_like(y)}, false, true)[0];
        },
        {v});
  }
}

TEST_CASE("reduction errors name the op", "[reduce]") {
  Tensor f = test::random_tensor({2, 3}, DType::f32, 800);
  Tensor i = test::random_tensor({2, 3}, DType::i64, 801);
  Tensor b = test::random_tensor({2, 3}, DType::boolean, 802);
  auto expect = [](const std::function<void()>& fn, const std::string& op) {
    REQUIRE_THROWS_AS(fn(), kiln::Error);
    REQUIRE_THROWS_WITH(fn(), ContainsSubstring("[" + op + "]"));
  };
  // dims out of range or repeated
  expect([&] { sum(f, {2}); }, "sum");
  expect([&] { mean(f, {-3}); }, "mean");
  expect([&] { amax(f, {0, -2}); }, "amax");
  expect([&] { amin(f, {5}); }, "amin");
  expect([&] { argmax(f, 2); }, "argmax");
  expect([&] { logsumexp(f, {1, 1}); }, "logsumexp");
  expect([&] { softmax(f, -3); }, "softmax");
  expect([&] { log_softmax(f, 2); }, "log_softmax");
  // float-only ops
  expect([&] { mean(i); }, "mean");
  expect([&] { mean(b, {0}); }, "mean");
  expect([&] { logsumexp(i, {1}); }, "logsumexp");
  expect([&] { softmax(b, 0); }, "softmax");
  expect([&] { log_softmax(i, 1); }, "log_softmax");
  // extrema of nothing
  Tensor z = zeros({2, 0});
  expect([&] { amax(z, {1}); }, "amax");
  expect([&] { amin(z); }, "amin");
  expect([&] { argmax(z, 1); }, "argmax");
}

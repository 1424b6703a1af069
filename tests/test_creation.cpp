// Creation ops: full/zeros/ones, arange, Philox rand/randn/randint/dropout_mask (determinism per
// seed, distribution statistics, dtype rules) and dropout (scaling, mask reuse in backward).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>

#include "core/philox.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {
std::vector<double> values(const Tensor& t) { return cast(t, DType::f64).to_vector<double>(); }
double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}
double var_of(const std::vector<double>& v) {
  double m = mean_of(v), s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return s / static_cast<double>(v.size());
}
}  // namespace

TEST_CASE("full, zeros, ones and the like helpers", "[creation]") {
  for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean}) {
    Tensor t = full({2, 3}, 1.0, dt);
    REQUIRE(t.dtype() == dt);
    for (double v : values(t)) REQUIRE(v == 1.0);
    for (double v : values(zeros_like(t))) REQUIRE(v == 0.0);
  }
  REQUIRE(values(full({3}, -2.5, DType::bf16)) == std::vector<double>{-2.5, -2.5, -2.5});
  REQUIRE(scalar_tensor(4.0).dim() == 0);
  REQUIRE(zeros({0, 5}).numel() == 0);
  REQUIRE_THROWS_WITH(zeros({2, -1}), ContainsSubstring("[full] negative dimension in shape (2, -1)"));
}

TEST_CASE("arange", "[creation]") {
  REQUIRE(arange(5).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 2, 3, 4});
  REQUIRE(values(arange(1.0, 2.0, 0.25, DType::f32)) == std::vector<double>{1.0, 1.25, 1.5, 1.75});
  REQUIRE(values(arange(5.0, 0.0, -2.0, DType::i32)) == std::vector<double>{5, 3, 1});
  REQUIRE(arange(3.0, 1.0, 1.0).numel() == 0);
  REQUIRE_THROWS_WITH(arange(0.0, 1.0, 0.0), ContainsSubstring("[arange] invalid range"));
}

TEST_CASE("rand is uniform in [0, 1) and reproducible per seed", "[creation][random]") {
  for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    Generator g(42);
    std::vector<double> v = values(rand({20000}, dt, kCPU, &g));
    for (double x : v) REQUIRE((x >= 0.0 && x < 1.0));
    REQUIRE(std::abs(mean_of(v) - 0.5) < 0.01);
    REQUIRE(std::abs(var_of(v) - 1.0 / 12) < 0.005);
  }
  // The CPU numbers follow the documented Philox recipe (the CUDA backend implements the same).
  Generator g(7);
  std::vector<float> v = rand({9}, DType::f32, kCPU, &g).to_vector<float>();
  for (uint64_t i = 0; i < 9; ++i) REQUIRE(v[i] == philox::uniform_bits(i, 0, 7, 24));
  std::vector<float> w = rand({9}, DType::f32, kCPU, &g).to_vector<float>();  // next offset
  for (uint64_t i = 0; i < 9; ++i) REQUIRE(w[i] == philox::uniform_bits(i, 1, 7, 24));
  REQUIRE_THROWS_WITH(rand({2}, DType::i64), ContainsSubstring("[rand] needs a floating dtype"));
}

TEST_CASE("randn is standard normal", "[creation][random]") {
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    Generator g(3);
    std::vector<double> v = values(randn({50000}, dt, kCPU, &g));
    REQUIRE(std::abs(mean_of(v)) < 0.02);
    REQUIRE(std::abs(var_of(v) - 1.0) < 0.03);
    int64_t beyond2 = 0;
    for (double x : v) beyond2 += std::abs(x) > 2.0;
    REQUIRE(std::abs(static_cast<double>(beyond2) / 50000.0 - 0.0455) < 0.005);
  }
  Generator a(5), b(5);
  test::require_equal(randn({3, 7}, DType::f32, kCPU, &a), randn({3, 7}, DType::f32, kCPU, &b));
}

TEST_CASE("randint covers [low, high) evenly", "[creation][random]") {
  Generator g(11);
  std::vector<int64_t> v = randint(-3, 4, {70000}, DType::i64, kCPU, &g).to_vector<int64_t>();
  std::vector<int64_t> counts(7, 0);
  for (int64_t x : v) {
    REQUIRE((x >= -3 && x < 4));
    ++counts[static_cast<size_t>(x + 3)];
  }
  for (int64_t c : counts) REQUIRE(std::abs(c - 10000) < 400);
  REQUIRE(randint(0, 256, {5}, DType::u8).dtype() == DType::u8);
  REQUIRE_THROWS_WITH(randint(3, 3, {2}), ContainsSubstring("[randint] empty range [3, 3)"));
}

TEST_CASE("dropout zeroes with probability p, scales by 1/(1-p), reuses its mask in backward", "[creation][random]") {
  Generator g(99);
  Tensor x = test::random_away_from_zero({200, 50}, DType::f64, 1).set_requires_grad();
  Tensor y = dropout(x, 0.3, true, &g);
  std::vector<double> xv = values(x), yv = values(y);
  int64_t dropped = 0;
  for (size_t i = 0; i < xv.size(); ++i) {
    if (yv[i] == 0.0) ++dropped;
    else REQUIRE(std::abs(yv[i] - xv[i] / 0.7) < 1e-12);
  }
  REQUIRE(std::abs(static_cast<double>(dropped) / 10000.0 - 0.3) < 0.02);
  Tensor r = test::random_tensor({200, 50}, DType::f64, 2);
  (y * r).sum().backward();
  std::vector<double> gv = values(x.grad()), rv = values(r);
  for (size_t i = 0; i < gv.size(); ++i) REQUIRE(std::abs(gv[i] - (yv[i] == 0.0 ? 0.0 : rv[i] / 0.7)) < 1e-12);
  // the mask matches dropout_mask for the same generator state
  Generator g2(99);
  std::vector<bool> keep = dropout_mask({200, 50}, 0.3, kCPU, &g2).to_vector<bool>();
  for (size_t i = 0; i < keep.size(); ++i) REQUIRE(keep[i] == (yv[i] != 0.0));
  // non-contiguous input: mask follows row-major order of the logical shape
  Generator g3(99), g4(99);
  Tensor nc = test::make_noncontiguous(x.detach());
  test::require_equal(dropout(nc, 0.3, true, &g3), dropout(nc.contiguous(), 0.3, true, &g4));
  REQUIRE(dropout(x, 0.5, false).impl() == x.impl());
  for (double v : values(dropout(x, 1.0, true))) REQUIRE(v == 0.0);
  REQUIRE_THROWS_WITH(dropout(x, 1.5), ContainsSubstring("[dropout] p must be in [0, 1]"));
  REQUIRE_THROWS_WITH(dropout(ones({2}, DType::i64), 0.5), ContainsSubstring("[dropout] expected a floating tensor"));
}

// View and copy ops: reshape/view, permute/transpose, slice/narrow/select, expand, squeeze,
// flatten, contiguous, cat/stack/split/chunk, cast, copy_/fill_, sum_to; values, aliasing,
// gradients (f64 finite differences) and errors.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {
// Reference: element at multi-index `idx` of a row-major value list with shape `s`.
double at(const std::vector<double>& v, const Shape& s, const std::vector<int64_t>& idx) {
  int64_t off = 0;
  for (size_t d = 0; d < s.size(); ++d) off = off * s[d] + idx[d];
  return v[static_cast<size_t>(off)];
}
std::vector<double> values(const Tensor& t) { return cast(t, DType::f64).to_vector<double>(); }
}  // namespace

TEST_CASE("reshape and view share storage and keep values", "[views]") {
  Tensor x = test::random_tensor({2, 3, 4}, DType::f32, 1);
  Tensor v = x.view({6, 4});
  REQUIRE(v.storage() == x.storage());
  REQUIRE(values(v) == values(x));
  REQUIRE(x.reshape({-1, 2}).shape() == Shape{12, 2});
  REQUIRE(x.reshape({4, -1, 1}).shape() == Shape{4, 6, 1});
  REQUIRE(x.reshape({24}).reshape({2, 3, 4}).storage() == x.storage());
  Tensor s = scalar_tensor(3.0);
  REQUIRE(s.reshape({1, 1}).shape() == Shape{1, 1});
  REQUIRE(s.reshape({1, 1}).reshape({}).item<double>() == 3.0);
  // a transposed tensor cannot be viewed flat, but reshape copies
  Tensor t = x.transpose(0, 2);  // (4, 3, 2)
  REQUIRE_THROWS_WITH(t.view({24}), ContainsSubstring("[view] cannot view a tensor of shape (4, 3, 2)"));
  Tensor r = t.reshape({24});
  REQUIRE(r.storage() != x.storage());
  std::vector<double> xv = values(x), rv = values(r);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 2; ++k) REQUIRE(rv[static_cast<size_t>(i * 6 + j * 2 + k)] == at(xv, {2, 3, 4}, {k, j, i}));
  // splitting a dim of a transposed view is still a view
  Tensor tv = t.view({2, 2, 3, 2});
  REQUIRE(tv.storage() == x.storage());
  REQUIRE_THROWS_WITH(x.reshape({5, -1}), ContainsSubstring("[reshape] shape (5, -1) is invalid for 24 elements"));
  REQUIRE_THROWS_WITH(x.reshape({-1, -1}), ContainsSubstring("only one dimension can be -1"));
  REQUIRE_THROWS_AS(x.view({7}), Error);
}

TEST_CASE("permute, transpose and contiguous", "[views]") {
  for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean}) {
    Tensor x = test::random_tensor({3, 1, 5, 2}, dt, 2);
    Tensor p = x.permute({2, 0, 3, 1});
    REQUIRE(p.shape() == Shape{5, 3, 2, 1});
    REQUIRE_FALSE(p.is_contiguous());
    Tensor c = p.contiguous();
    REQUIRE(c.is_contiguous());
    REQUIRE(c.dtype() == dt);
    std::vector<double> xv = values(x), cv = values(c);
    for (int64_t a = 0; a < 5; ++a)
      for (int64_t b = 0; b < 3; ++b)
        for (int64_t d = 0; d < 2; ++d) REQUIRE(cv[static_cast<size_t>((a * 3 + b) * 2 + d)] == at(xv, {3, 1, 5, 2}, {b, 0, a, d}));
  }
  Tensor x = randn({2, 3});
  REQUIRE(x.t().shape() == Shape{3, 2});
  REQUIRE(x.contiguous().storage() == x.storage());  // already contiguous: no copy
  REQUIRE_THROWS_WITH(x.permute({0, 0}), ContainsSubstring("[permute] (0, 0) is not a permutation"));
  REQUIRE_THROWS_WITH(x.permute({0}), ContainsSubstring("[permute] got 1 dims for a 2-d tensor"));
  REQUIRE_THROWS_WITH(x.transpose(0, 2), ContainsSubstring("[transpose] dim 2 out of range for a 2-d tensor"));
}

TEST_CASE("slice, narrow and select pick the right elements", "[views]") {
  Tensor x = test::random_tensor({4, 7, 3}, DType::f32, 3);
  std::vector<double> xv = values(x);
  Tensor s = x.slice(1, 1, 7, 2);  // columns 1, 3, 5
  REQUIRE(s.shape() == Shape{4, 3, 3});
  REQUIRE(s.storage() == x.storage());
  std::vector<double> sv = values(s);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 3; ++k) REQUIRE(sv[static_cast<size_t>((i * 3 + j) * 3 + k)] == at(xv, {4, 7, 3}, {i, 1 + 2 * j, k}));
  REQUIRE(x.slice(1, -3, 100).shape() == Shape{4, 3, 3});  // python-style clamping
  REQUIRE(x.slice(0, 3, 1).shape() == Shape{0, 7, 3});
  Tensor n = x.narrow(2, 1, 2).narrow(0, 2, 2);
  REQUIRE(values(n.select(0, 1).select(0, 6))[1] == at(xv, {4, 7, 3}, {3, 6, 2}));
  REQUIRE(x.select(1, -1).shape() == Shape{4, 3});
  REQUIRE_THROWS_WITH(x.narrow(1, 5, 3), ContainsSubstring("[narrow] range [5, 8) out of bounds for dim 1 of size 7"));
  REQUIRE_THROWS_WITH(x.select(0, 4), ContainsSubstring("[select] index 4 out of range"));
  REQUIRE_THROWS_WITH(x.slice(0, 0, 2, 0), ContainsSubstring("[slice] step must be positive"));
}

TEST_CASE("expand, unsqueeze, squeeze, flatten", "[views]") {
  Tensor x = test::random_tensor({3, 1}, DType::f64, 4);
  Tensor e = x.expand({2, 3, 4});
  REQUIRE(e.strides()[0] == 0);
  REQUIRE(e.strides()[2] == 0);
  std::vector<double> xv = values(x), ev = values(e);
  for (size_t i = 0; i < ev.size(); ++i) REQUIRE(ev[i] == xv[(i / 4) % 3]);
  REQUIRE(x.expand({-1, 5}).shape() == Shape{3, 5});
  REQUIRE_THROWS_WITH(x.expand({4, 4}), ContainsSubstring("[expand] cannot expand (3, 1) to (4, 4)"));
  REQUIRE(x.unsqueeze(0).shape() == Shape{1, 3, 1});
  REQUIRE(x.unsqueeze(-1).shape() == Shape{3, 1, 1});
  REQUIRE(x.squeeze(1).shape() == Shape{3});
  REQUIRE(x.squeeze(0).shape() == Shape{3, 1});  // not size 1: unchanged
  REQUIRE(randn({2, 3, 4, 5}).flatten(1, 2).shape() == Shape{2, 12, 5});
  REQUIRE(randn({2, 3}).flatten().shape() == Shape{6});
}

TEST_CASE("cat, stack, split and chunk", "[views]") {
  for (DType dt : {DType::f32, DType::bf16, DType::i64}) {
    Tensor a = test::random_tensor({2, 3, 2}, dt, 5), b = test::random_tensor({2, 1, 2}, dt, 6, true);
    Tensor c = test::random_tensor({2, 4, 2}, dt, 7);
    Tensor y = cat({a, b, c}, 1);
    REQUIRE(y.shape() == Shape{2, 8, 2});
    std::vector<Tensor> parts = split(y, std::vector<int64_t>{3, 1, 4}, 1);
    test::require_equal(parts[0], a);
    test::require_equal(parts[1], b);
    test::require_equal(parts[2], c);
    Tensor s = stack({a, a}, 0);
    REQUIRE(s.shape() == Shape{2, 2, 3, 2});
    test::require_equal(s.select(0, 1), a);
  }
  Tensor x = randn({10, 3});
  std::vector<Tensor> sp = split(x, 4, 0);
  REQUIRE(sp.size() == 3);
  REQUIRE(sp[2].shape() == Shape{2, 3});
  std::vector<Tensor> ch = chunk(x, 3, 0);
  REQUIRE(ch.size() == 3);
  REQUIRE(ch[0].shape() == Shape{4, 3});
  REQUIRE(ch[2].shape() == Shape{2, 3});
  REQUIRE_THROWS_WITH(cat({randn({2, 3}), randn({3, 3})}, 1), ContainsSubstring("[cat] sizes must match except in dim 1"));
  REQUIRE_THROWS_WITH(cat({randn({2}), randn({2}, DType::f64)}, 0), ContainsSubstring("[cat] dtype mismatch"));
  REQUIRE_THROWS_WITH(split(x, std::vector<int64_t>{3, 3}, 0), ContainsSubstring("[split] sizes (3, 3) add up to 6"));
  REQUIRE_THROWS_WITH(stack({randn({2}), randn({3})}, 0), ContainsSubstring("[stack]"));
}

TEST_CASE("cast converts between every pair of dtypes", "[views]") {
  Tensor x = from_vector<double>({-2.75, -1.0, 0.0, 0.5, 3.0, 200.0}, {6});
  REQUIRE(cast(x, DType::i64).to_vector<int64_t>() == std::vector<int64_t>{-2, -1, 0, 0, 3, 200});
  REQUIRE(cast(x, DType::boolean).to_vector<bool>() == std::vector<bool>{true, true, false, true, true, true});
  REQUIRE(cast(cast(x, DType::bf16), DType::f64).to_vector<double>() == std::vector<double>{-2.75, -1, 0, 0.5, 3, 200});
  REQUIRE(cast(cast(x, DType::f16), DType::f32).to_vector<float>() == std::vector<float>{-2.75f, -1, 0, 0.5f, 3, 200});
  Tensor nc = test::make_noncontiguous(test::random_tensor({3, 4}, DType::f32, 8));
  test::require_equal(cast(cast(nc, DType::f64), DType::f32), nc);
}

TEST_CASE("copy_ broadcasts and converts; fill_ writes views", "[views]") {
  Tensor dst = zeros({3, 4}, DType::f64);
  Tensor row = test::random_tensor({4}, DType::f32, 9);
  dst.copy_(row);
  std::vector<double> dv = values(dst), rv = values(row);
  for (size_t i = 0; i < dv.size(); ++i) REQUIRE(dv[i] == rv[i % 4]);
  dst.slice(1, 0, 4, 2).fill_(7.0);  // strided view
  dv = values(dst);
  for (size_t i = 0; i < dv.size(); ++i) REQUIRE(dv[i] == (i % 2 == 0 ? 7.0 : rv[i % 4]));
  REQUIRE_THROWS_WITH(dst.copy_(randn({5})), ContainsSubstring("[copy]"));
  Tensor leaf = randn({2}, DType::f64).set_requires_grad();
  REQUIRE_THROWS_WITH(leaf.fill_(1.0), ContainsSubstring("in-place write to a tensor that requires grad"));
  {
    autograd::NoGradGuard ng;
    leaf.fill_(1.0);
  }
  REQUIRE(leaf.to_vector<double>() == std::vector<double>{1, 1});
}

TEST_CASE("sum_to reverses broadcasting", "[views]") {
  Tensor g = test::random_tensor({2, 3, 4}, DType::f64, 10);
  Tensor s = sum_to(g, {3, 1});
  REQUIRE(s.shape() == Shape{3, 1});
  std::vector<double> gv = values(g), sv = values(s);
  for (int64_t j = 0; j < 3; ++j) {
    double acc = 0;
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t k = 0; k < 4; ++k) acc += at(gv, {2, 3, 4}, {i, j, k});
    REQUIRE(std::abs(sv[static_cast<size_t>(j)] - acc) < 1e-12);
  }
  REQUIRE_THROWS_AS(sum_to(g, {5}), Error);
}

TEST_CASE("view and copy ops have correct gradients", "[views][grad]") {
  auto x = [](const Shape& s, uint64_t seed) { return test::random_tensor(s, DType::f64, seed).set_requires_grad(); };
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].reshape({3, -1}); }, {x({2, 3, 2}, 11)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].permute({2, 0, 1}); }, {x({2, 3, 2}, 12)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].transpose(0, 1).reshape({6}); }, {x({2, 3}, 13)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].slice(1, 1, 5, 3); }, {x({2, 6}, 14)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].select(0, 1); }, {x({3, 2}, 15)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].expand({4, 3, 2}); }, {x({3, 1}, 16)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].unsqueeze(1).squeeze(1).flatten(); }, {x({2, 2}, 17)});
  test::check_gradients([](const std::vector<Tensor>& in) { return cat({in[0], in[1], in[0]}, 0); }, {x({2, 3}, 18), x({1, 3}, 19)});
  test::check_gradients([](const std::vector<Tensor>& in) { return stack({in[0], in[1]}, 1); }, {x({2, 3}, 20), x({2, 3}, 21)});
  test::check_gradients([](const std::vector<Tensor>& in) { return split(in[0], 2, 1)[1]; }, {x({2, 5}, 22)});
  test::check_gradients([](const std::vector<Tensor>& in) { return in[0].transpose(0, 1).contiguous(); }, {x({3, 2}, 23)});
  test::check_gradients([](const std::vector<Tensor>& in) { return cast(cast(in[0], DType::f32), DType::f64); }, {x({4}, 24)},
                        1e-3, 1e-3, 1e-4);
  test::check_gradients([](const std::vector<Tensor>& in) { return sum_to(in[0], {2, 1}); }, {x({3, 2, 4}, 25)});
}

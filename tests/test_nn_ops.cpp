// Tests of embedding, rms_norm, rotary_embedding, cross_entropy and swiglu: the fused op, its composite
// fallback and a plain double-loop reference on random inputs in every float dtype, finite-difference
// gradients of both in f64, and the errors. Attention is in test_nn_attention.cpp.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>

#include "core/memory.h"
#include "core/ops/indexing.h"
#include "core/ops/loss.h"
#include "core/ops/norm.h"
#include "core/dispatch.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

const DType kFloats[] = {DType::f64, DType::f32, DType::bf16, DType::f16};

struct Tol {
  double rtol, atol;
};
// Tolerance for a result rounded once to `d` after computing in f32 (f64 for f64).
Tol tol_for(DType d) {
  switch (d) {
    case DType::f64: return {1e-10, 1e-12};
    case DType::f32: return {1e-5, 1e-5};
    case DType::bf16: return {2e-2, 2e-2};
    default: return {4e-3, 4e-3};
  }
}

// Host values of any tensor as doubles (no kiln op on the way).
std::vector<double> vals(const Tensor& t) {
  return visit_dtype(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<double> out;
    if constexpr (!std::is_same_v<T, bool>) {
      for (const T& x : t.to_vector<T>()) out.push_back(static_cast<double>(static_cast<compute_t<T>>(x)));
    }
    return out;
  });
}

Tensor f64_tensor(const std::vector<double>& v, const Shape& s) { return from_vector<double>(v, s); }

void check_close(const Tensor& got, const Tensor& want, DType d) {
  const Tol t = tol_for(d);
  test::require_close(got, want, t.rtol, t.atol);
}

Tensor random_ids(const Shape& shape, int64_t high, DType dtype, uint64_t seed) {
  Generator gen(seed);
  autograd::NoGradGuard no_grad;
  Tensor ids = randint(0, high, shape, DType::i64, kCPU, &gen);
  return dtype == DType::i64 ? ids : cast(ids, dtype);
}

}  // namespace

// ---------------------------------------------------------------- embedding

TEST_CASE("embedding gathers rows in every dtype and layout", "[nn_ops]") {
  for (DType dt : kFloats) {
    for (DType it : {DType::i64, DType::i32}) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " ids " << dtype_name(it) << " noncontiguous " << nc);
        const int64_t v = 7, d = 5;
        Tensor w = test::random_tensor({v, d}, dt, 1, nc);
        Tensor ids = random_ids({3, 4}, v, it, 2);
        if (nc) ids = test::make_noncontiguous(ids);
        Tensor y = embedding(w, ids);
        REQUIRE(y.shape() == Shape{3, 4, d});
        REQUIRE(y.dtype() == dt);
        std::vector<double> wv = vals(w), iv = vals(ids), ref;
        for (double id : iv) {
          for (int64_t j = 0; j < d; ++j) ref.push_back(wv[static_cast<size_t>(static_cast<int64_t>(id) * d + j)]);
        }
        test::require_equal(y, f64_tensor(ref, {3, 4, d}));
      }
    }
  }
  // 0-d ids give one row
  Tensor w = test::random_tensor({4, 3}, DType::f32, 3);
  Tensor y = embedding(w, from_vector<int64_t>({2}, {}));
  REQUIRE(y.shape() == Shape{3});
  test::require_equal(y, select(w, 0, 2));
}

TEST_CASE("embedding backward scatter-adds repeated ids", "[nn_ops]") {
  for (DType dt : kFloats) {
    INFO(dtype_name(dt));
    const int64_t v = 6, d = 9;
    Tensor ids = random_ids({5, 7}, v - 1, DType::i32, 4);  // id v-1 never appears: its row stays 0
    Tensor g = test::random_tensor({5, 7, d}, dt, 5, true);
    Tensor dw = dispatch1(std::make_shared<const prim::EmbeddingBackward>(v), {g, ids});
    REQUIRE(dw.shape() == Shape{v, d});
    std::vector<double> gv = vals(g), iv = vals(ids), ref(static_cast<size_t>(v * d), 0.0);
    for (size_t n = 0; n < iv.size(); ++n) {
      for (int64_t j = 0; j < d; ++j) ref[static_cast<size_t>(static_cast<int64_t>(iv[n]) * d + j)] += gv[n * d + j];
    }
    check_close(dw, f64_tensor(ref, {v, d}), dt);
  }
}

TEST_CASE("embedding gradients match finite differences", "[nn_ops]") {
  Tensor ids = random_ids({4, 3}, 5, DType::i64, 6);  // 12 ids over 5 rows: repeats
  Tensor w = test::random_tensor({5, 3}, DType::f64, 7).set_requires_grad();
  test::check_gradients([&](const std::vector<Tensor>& in) { return embedding(in[0], ids); }, {w});
  Tensor wn = test::random_tensor({5, 3}, DType::f64, 8, true).set_requires_grad();
  test::check_gradients([&](const std::vector<Tensor>& in) { return embedding(in[0], ids); }, {wn});
  // embedding_backward is linear in its gradient input; its vjp is an embedding
  Tensor g = test::random_tensor({4, 3, 3}, DType::f64, 9).set_requires_grad();
  test::check_gradients(
      [&](const std::vector<Tensor>& in) {
        return dispatch1(std::make_shared<const prim::EmbeddingBackward>(5), {in[0], ids});
      },
      {g});
}

TEST_CASE("embedding rejects bad input", "[nn_ops]") {
  Tensor w = test::random_tensor({7, 3}, DType::f32, 10);
  REQUIRE_THROWS_WITH(embedding(w, from_vector<int64_t>({1, 7}, {2})),
                      ContainsSubstring("[embedding]") && ContainsSubstring("id 7") && ContainsSubstring("V = 7"));
  REQUIRE_THROWS_WITH(embedding(w, from_vector<int32_t>({-1}, {1})),
                      ContainsSubstring("[embedding]") && ContainsSubstring("id -1"));
  REQUIRE_THROWS_WITH(embedding(w, test::random_tensor({2}, DType::f32, 11)),
                      ContainsSubstring("[embedding]") && ContainsSubstring("i64 or i32"));
  REQUIRE_THROWS_WITH(embedding(test::random_tensor({7}, DType::f32, 12), from_vector<int64_t>({1}, {1})),
                      ContainsSubstring("[embedding]") && ContainsSubstring("2-d"));
  REQUIRE_THROWS_AS(embedding(random_ids({3}, 5, DType::i64, 13).reshape({3, 1}), from_vector<int64_t>({0}, {1})),
                    kiln::Error);
}

// ---------------------------------------------------------------- rms_norm

namespace {

Tensor rms_norm_reference(const Tensor& x, const Tensor& w, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  std::vector<double> xv = vals(x), wv = vals(w), out(xv.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += xv[static_cast<size_t>(r * d + j)] * xv[static_cast<size_t>(r * d + j)];
    const double rstd = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (int64_t j = 0; j < d; ++j) {
      out[static_cast<size_t>(r * d + j)] = xv[static_cast<size_t>(r * d + j)] * rstd * wv[static_cast<size_t>(j)];
    }
  }
  return f64_tensor(out, x.shape());
}

}  // namespace

TEST_CASE("rms_norm fused and composite match a reference", "[nn_ops]") {
  const Shape shapes[] = {{3, 5, 7}, {1, 13}, {4, 1}, {6}, {2, 64}};
  for (DType dt : kFloats) {
    for (const Shape& s : shapes) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(s) << " noncontiguous " << nc);
        Tensor x = test::random_tensor(s, dt, 20, nc);
        Tensor w = test::random_tensor({s.back()}, dt, 21, nc);
        Tensor ref = rms_norm_reference(x, w, 1e-5);
        Tensor fused = rms_norm(x, w, 1e-5);
        Tensor comp = rms_norm_composite(x, w, 1e-5);
        REQUIRE(fused.dtype() == dt);
        REQUIRE(comp.dtype() == dt);
        check_close(fused, ref, dt);
        check_close(comp, ref, dt);
        check_close(fused, comp, dt);
      }
    }
  }
}

TEST_CASE("rms_norm gradients match finite differences and the composite", "[nn_ops]") {
  for (bool nc : {false, true}) {
    INFO("noncontiguous " << nc);
    Tensor x = test::random_tensor({3, 2, 5}, DType::f64, 22, nc).set_requires_grad();
    Tensor w = test::random_tensor({5}, DType::f64, 23).set_requires_grad();
    test::check_gradients([](const std::vector<Tensor>& in) { return rms_norm(in[0], in[1], 1e-6); }, {x, w});
    test::check_gradients([](const std::vector<Tensor>& in) { return rms_norm_composite(in[0], in[1], 1e-6); }, {x, w});
  }
  // the backward kernel in low precision against the composite's autograd
  for (DType dt : kFloats) {
    INFO(dtype_name(dt));
    Tensor x = test::random_tensor({37, 11}, dt, 24).set_requires_grad();  // 37 rows: more than one dw block
    Tensor w = test::random_tensor({11}, dt, 25).set_requires_grad();
    Tensor g = test::random_tensor({37, 11}, dt, 26, true);
    std::vector<Tensor> fused = autograd::grad({rms_norm(x, w, 1e-5)}, {x, w}, {g});
    std::vector<Tensor> comp = autograd::grad({rms_norm_composite(x, w, 1e-5)}, {x, w}, {g});
    const Tol t = tol_for(dt);
    test::require_close(fused[0], comp[0], t.rtol, t.atol);
    test::require_close(fused[1], comp[1], t.rtol, t.atol * 10);  // dw sums 37 rounded rows
  }
}

TEST_CASE("rms_norm's backward adds the gradient gathered for x in its kernel", "[nn_ops]") {
  // x (an op's output: the engine gathers gradients of nodes, not of leaves) feeds the norm and a
  // residual path created after it, so the residual's gradient is gathered when the norm's vjp runs:
  // the backward kernel adds it to dx (one rounding), no add op.
  auto block = [](auto norm) {
    return [norm](const std::vector<Tensor>& in) {
      const Tensor x = mul(in[0], 1.5);
      const Tensor n = norm(x, in[1], 1e-6);
      return add(n, mul(x, in[2]));
    };
  };
  const auto fused = block([](const Tensor& x, const Tensor& w, double eps) { return rms_norm(x, w, eps); });
  const auto composite = block([](const Tensor& x, const Tensor& w, double eps) { return rms_norm_composite(x, w, eps); });
  Tensor x = test::random_tensor({3, 2, 5}, DType::f64, 40).set_requires_grad();
  Tensor w = test::random_tensor({5}, DType::f64, 41).set_requires_grad();
  test::check_gradients(fused, {x, w, test::random_tensor({3, 2, 5}, DType::f64, 42)});
  for (DType dt : kFloats) {
    INFO(dtype_name(dt));
    Tensor xd = test::random_tensor({37, 11}, dt, 43).set_requires_grad();
    Tensor wd = test::random_tensor({11}, dt, 44).set_requires_grad();
    const Tensor c = test::random_tensor({37, 11}, dt, 45), g = test::random_tensor({37, 11}, dt, 46);
    std::vector<Tensor> got;
    {
      const Tensor y = fused({xd, wd, c});
      test::OpCounter ops;
      got = autograd::grad({y}, {xd, wd}, {g});
      REQUIRE(ops.count("rms_norm_backward") == 1);
      REQUIRE(ops.count("add") == 0);
    }
    const std::vector<Tensor> want = autograd::grad({composite({xd, wd, c})}, {xd, wd}, {g});
    const Tol t = tol_for(dt);
    test::require_close(got[0], want[0], t.rtol, t.atol);
    test::require_close(got[1], want[1], t.rtol, t.atol * 10);
  }
  // The primitive takes any layout of addend (a broadcast seed, say) and adds it after the gradient.
  Tensor x3 = test::random_tensor({4, 6}, DType::f32, 47), w3 = test::random_tensor({6}, DType::f32, 48);
  Tensor g3 = test::random_tensor({4, 6}, DType::f32, 49);
  const Tensor a3 = expand(test::random_tensor({1, 6}, DType::f32, 50), {4, 6});
  const auto plain = dispatch(std::make_shared<const prim::RmsNormBackward>(1e-5), {x3, w3, g3});
  const auto summed = dispatch(std::make_shared<const prim::RmsNormBackward>(1e-5), {x3, w3, g3, a3});
  test::require_close(summed[0], add(plain[0], a3), 1e-6, 1e-6);
  test::require_equal(summed[1], plain[1]);
  REQUIRE_THROWS_WITH(dispatch(std::make_shared<const prim::RmsNormBackward>(1e-5), {x3, w3, g3, ones({4, 5})}),
                      ContainsSubstring("the addend must match x"));
}

TEST_CASE("rms_norm rejects bad input", "[nn_ops]") {
  Tensor x = test::random_tensor({3, 4}, DType::f32, 27);
  REQUIRE_THROWS_WITH(rms_norm(x, test::random_tensor({5}, DType::f32, 28), 1e-5),
                      ContainsSubstring("[rms_norm]") && ContainsSubstring("(4,)"));
  REQUIRE_THROWS_WITH(rms_norm(x, test::random_tensor({4}, DType::bf16, 29), 1e-5),
                      ContainsSubstring("[rms_norm]") && ContainsSubstring("dtype"));
  REQUIRE_THROWS_WITH(rms_norm_composite(x, test::random_tensor({4}, DType::f64, 30), 1e-5),
                      ContainsSubstring("[rms_norm]"));
  REQUIRE_THROWS_WITH(rms_norm(random_ids({3, 4}, 5, DType::i64, 31), random_ids({4}, 5, DType::i64, 32), 1e-5),
                      ContainsSubstring("[rms_norm]") && ContainsSubstring("float"));
  REQUIRE_THROWS_WITH(rms_norm(x, test::random_tensor({4}, DType::f32, 33), -1.0), ContainsSubstring("[rms_norm]"));
}

// ---------------------------------------------------------------- rotary_embedding

namespace {

// cos/sin (T, D/2) of Llama's positions t * theta^(-2i/D), with an offset so no angle is 0.
std::pair<Tensor, Tensor> rope_tables(int64_t t, int64_t d, DType dtype) {
  std::vector<double> c, s;
  for (int64_t p = 0; p < t; ++p) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const double angle = static_cast<double>(p + 3) * std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(d));
      c.push_back(std::cos(angle));
      s.push_back(std::sin(angle));
    }
  }
  autograd::NoGradGuard no_grad;
  return {cast(f64_tensor(c, {t, d / 2}), dtype), cast(f64_tensor(s, {t, d / 2}), dtype)};
}

// x (..., T, D); cos/sin (T, D/2) or broadcasting (..., T, D/2) given already expanded to x's lead.
Tensor rope_reference(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t d = x.size(-1), h = d / 2, rows = x.numel() / d;
  Shape half = x.shape();
  half.back() = h;
  std::vector<double> xv = vals(x), cv = vals(broadcast_to(cos, half)), sv = vals(broadcast_to(sin, half));
  std::vector<double> out(xv.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < h; ++i) {
      const double a = xv[static_cast<size_t>(r * d + i)], b = xv[static_cast<size_t>(r * d + i + h)];
      const double c = cv[static_cast<size_t>(r * h + i)], s = sv[static_cast<size_t>(r * h + i)];
      out[static_cast<size_t>(r * d + i)] = a * c - b * s;
      out[static_cast<size_t>(r * d + i + h)] = b * c + a * s;
    }
  }
  return f64_tensor(out, x.shape());
}

}  // namespace

TEST_CASE("rotary_embedding fused and composite match a reference", "[nn_ops]") {
  for (DType dt : kFloats) {
    for (DType table : {dt, DType::f32}) {
      for (int64_t d : {2, 8, 14}) {
        INFO(dtype_name(dt) << " tables " << dtype_name(table) << " D " << d);
        const int64_t b = 2, h = 3, t = 5;
        auto [cos, sin] = rope_tables(t, d, table);
        // contiguous (B, H, T, D), and the usual permuted view of (B, T, H, D)
        Tensor xs[] = {test::random_tensor({b, h, t, d}, dt, 40),
                       permute(test::random_tensor({b, t, h, d}, dt, 41), {0, 2, 1, 3})};
        for (const Tensor& x : xs) {
          Tensor ref = rope_reference(x, cos, sin);
          check_close(rotary_embedding(x, cos, sin), ref, dt);
          check_close(rotary_embedding_composite(x, cos, sin), ref, dt);
        }
      }
    }
  }
  // per-sequence tables (B, 1, T, D/2) broadcast over heads; non-contiguous tables
  auto [c0, s0] = rope_tables(4, 6, DType::f32);
  auto [c1, s1] = rope_tables(4 + 2, 6, DType::f32);
  Tensor cos = test::make_noncontiguous(stack({c0, narrow(c1, 0, 2, 4)}, 0).unsqueeze(1));  // (2, 1, 4, 3)
  Tensor sin = test::make_noncontiguous(stack({s0, narrow(s1, 0, 2, 4)}, 0).unsqueeze(1));
  Tensor x = test::random_tensor({2, 3, 4, 6}, DType::f32, 42, true);
  Tensor ref = rope_reference(x, cos, sin);
  check_close(rotary_embedding(x, cos, sin), ref, DType::f32);
  check_close(rotary_embedding_composite(x, cos, sin), ref, DType::f32);
}

TEST_CASE("rotary_embedding gradients match finite differences", "[nn_ops]") {
  const auto [cos, sin] = rope_tables(3, 6, DType::f64);
  Tensor x = test::random_tensor({2, 2, 3, 6}, DType::f64, 43).set_requires_grad();
  Tensor xn = permute(test::random_tensor({2, 3, 2, 6}, DType::f64, 44), {0, 2, 1, 3}).detach().set_requires_grad();
  for (const Tensor& in : {x, xn}) {
    const Tensor c = cos, s = sin;  // (lambdas capture these, not the structured bindings)
    test::check_gradients([&](const std::vector<Tensor>& v) { return rotary_embedding(v[0], c, s); }, {in});
    test::check_gradients([&](const std::vector<Tensor>& v) { return rotary_embedding_composite(v[0], c, s); }, {in});
  }
  // the backward pass of a half-precision rotation against the composite's
  Tensor xb = test::random_tensor({2, 3, 6}, DType::bf16, 45).set_requires_grad();
  auto [cb, sb] = rope_tables(3, 6, DType::f32);
  Tensor g = test::random_tensor({2, 3, 6}, DType::bf16, 46);
  Tensor fused = autograd::grad({rotary_embedding(xb, cb, sb)}, {xb}, {g})[0];
  Tensor comp = autograd::grad({rotary_embedding_composite(xb, cb, sb)}, {xb}, {g})[0];
  check_close(fused, comp, DType::bf16);
  // backward needs only cos and sin: the rotated tensor is freed once forward drops it (Llama's q and
  // k projections' outputs are not held until the attention's backward)
  Tensor x2 = test::random_tensor({2, 2, 3, 6}, DType::f64, 47).set_requires_grad();
  Tensor y;
  size_t with_h = 0;
  {
    const Tensor h = mul(x2, 3.0);  // (2, 2, 3, 6) f64
    with_h = memory_usage(kCPU).allocated;
    y = rotary_embedding(h, cos, sin);
  }
  CHECK(memory_usage(kCPU).allocated == with_h);  // y in, h out
  const Tensor gy = test::random_tensor({2, 2, 3, 6}, DType::f64, 48);
  y.backward(gy);
  test::require_close(x2.grad(), mul(rotary_embedding(gy, cos, neg(sin)), 3.0), 1e-12, 1e-12);
}

TEST_CASE("rotary_embedding rejects bad input", "[nn_ops]") {
  auto [cos, sin] = rope_tables(5, 8, DType::f32);
  Tensor x = test::random_tensor({2, 5, 8}, DType::f32, 47);
  auto [c7, s7] = rope_tables(5, 6, DType::f32);
  REQUIRE_THROWS_WITH(rotary_embedding(test::random_tensor({2, 5, 7}, DType::f32, 48), c7, s7),
                      ContainsSubstring("[rotary_embedding]") && ContainsSubstring("even"));
  auto [c4, s4] = rope_tables(4, 8, DType::f32);
  REQUIRE_THROWS_WITH(rotary_embedding(x, c4, s4), ContainsSubstring("[rotary_embedding]") && ContainsSubstring("(5, 4)"));
  REQUIRE_THROWS_WITH(rotary_embedding_composite(x, c4, s4), ContainsSubstring("[rotary_embedding]"));
  REQUIRE_THROWS_WITH(rotary_embedding(x, cast(cos, DType::f64), cast(sin, DType::f64)),
                      ContainsSubstring("[rotary_embedding]") && ContainsSubstring("dtype"));
  REQUIRE_THROWS_WITH(rotary_embedding(x, cos, cast(sin, DType::bf16)), ContainsSubstring("[rotary_embedding]"));
  REQUIRE_THROWS_WITH(rotary_embedding(test::random_tensor({8}, DType::f32, 49), cos, sin),
                      ContainsSubstring("[rotary_embedding]"));
}

// ---------------------------------------------------------------- cross_entropy

namespace {

const Reduction kReductions[] = {Reduction::none, Reduction::sum, Reduction::mean};

Tensor cross_entropy_reference(const Tensor& logits, const Tensor& targets, int64_t ignore, Reduction red) {
  const int64_t n = logits.size(0), v = logits.size(1);
  std::vector<double> lv = vals(logits), tv = vals(targets), loss(static_cast<size_t>(n), 0.0);
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = static_cast<int64_t>(tv[static_cast<size_t>(r)]);
    if (t == ignore) continue;
    double m = -INFINITY, l = 0;
    for (int64_t j = 0; j < v; ++j) m = std::max(m, lv[static_cast<size_t>(r * v + j)]);
    for (int64_t j = 0; j < v; ++j) l += std::exp(lv[static_cast<size_t>(r * v + j)] - m);
    loss[static_cast<size_t>(r)] = m + std::log(l) - lv[static_cast<size_t>(r * v + t)];
    total += loss[static_cast<size_t>(r)];
    ++count;
  }
  if (red == Reduction::none) return f64_tensor(loss, {n});
  if (red == Reduction::mean) total = count == 0 ? 0.0 : total / static_cast<double>(count);
  return f64_tensor({total}, {});
}

// Targets in [0, V) with rows 1 and n-2 set to ignore_index.
Tensor ce_targets(int64_t n, int64_t v, int64_t ignore, DType dtype, uint64_t seed) {
  std::vector<double> t = vals(random_ids({n}, v, DType::i64, seed));
  t[1] = static_cast<double>(ignore);
  t[static_cast<size_t>(n - 2)] = static_cast<double>(ignore);
  std::vector<int64_t> ti(t.begin(), t.end());
  Tensor out = from_vector<int64_t>(ti, {n});
  return dtype == DType::i64 ? out : cast(out, dtype);
}

}  // namespace

TEST_CASE("cross_entropy fused and composite match a reference", "[nn_ops]") {
  for (DType dt : kFloats) {
    for (Reduction red : kReductions) {
      for (int64_t ignore : {int64_t{-100}, int64_t{3}}) {
        for (bool nc : {false, true}) {
          INFO(dtype_name(dt) << " reduction " << prim::reduction_name(red) << " ignore " << ignore << " nc " << nc);
          const int64_t n = 6, v = 11;
          Tensor logits = mul(test::random_tensor({n, v}, dt, 60, nc), 3.0);
          Tensor targets = ce_targets(n, v, ignore, nc ? DType::i32 : DType::i64, 61);
          if (nc) targets = test::make_noncontiguous(targets);
          Tensor ref = cross_entropy_reference(logits, targets, ignore, red);
          Tensor fused = cross_entropy(logits, targets, ignore, red);
          Tensor comp = cross_entropy_composite(logits, targets, ignore, red);
          REQUIRE(fused.dtype() == dt);
          check_close(fused, ref, dt);
          check_close(comp, ref, dt);
        }
      }
    }
  }
}

TEST_CASE("cross_entropy with every row ignored is 0, not NaN", "[nn_ops]") {
  Tensor logits = test::random_tensor({3, 4}, DType::f32, 62).set_requires_grad();
  Tensor targets = from_vector<int64_t>({-100, -100, -100}, {3});
  for (Reduction red : kReductions) {
    INFO(prim::reduction_name(red));
    Tensor zero = red == Reduction::none ? zeros({3}) : zeros({});
    test::require_equal(cross_entropy(logits, targets, -100, red), zero);
    test::require_equal(cross_entropy_composite(logits, targets, -100, red), zero);
    Tensor g = autograd::grad({cross_entropy(logits, targets, -100, red)}, {logits}, {ones_like(zero)})[0];
    test::require_equal(g, zeros({3, 4}));
  }
}

TEST_CASE("cross_entropy gradients match finite differences and the composite", "[nn_ops]") {
  for (Reduction red : kReductions) {
    INFO(prim::reduction_name(red));
    Tensor targets = ce_targets(5, 7, -1, DType::i64, 63);
    Tensor logits = test::random_tensor({5, 7}, DType::f64, 64, true).set_requires_grad();
    test::check_gradients([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets, -1, red); },
                          {logits});
    test::check_gradients(
        [&](const std::vector<Tensor>& in) { return cross_entropy_composite(in[0], targets, -1, red); }, {logits});
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      INFO(dtype_name(dt));
      Tensor l = test::random_tensor({5, 7}, dt, 65).set_requires_grad();
      Tensor g = red == Reduction::none ? test::random_tensor({5}, dt, 66) : full({}, 1.7, dt);
      Tensor fused = autograd::grad({cross_entropy(l, targets, -1, red)}, {l}, {g})[0];
      Tensor comp = autograd::grad({cross_entropy_composite(l, targets, -1, red)}, {l}, {g})[0];
      check_close(fused, comp, dt);
    }
  }
}

namespace {
// The attributes of every cross_entropy / cross_entropy_backward primitive dispatched in its scope.
struct CrossEntropyAttrs : DispatchObserver {
  std::vector<std::string> fwd, bwd;
  ObserverScope scope{this};
  void on_op(const Primitive& op, const std::vector<Tensor>&, const std::vector<Tensor>&) override {
    if (std::string(op.name()) == "cross_entropy") fwd.push_back(op.attributes());
    if (std::string(op.name()) == "cross_entropy_backward") bwd.push_back(op.attributes());
  }
};
}  // namespace

TEST_CASE("cross_entropy_unchecked matches cross_entropy; no backward re-checks", "[nn_ops]") {
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    for (Reduction red : {Reduction::none, Reduction::sum, Reduction::mean}) {
      INFO(dtype_name(dt) << " " << prim::reduction_name(red));
      Tensor logits = test::random_tensor({9, 13}, dt, 71).set_requires_grad();
      Tensor targets = from_vector<int64_t>({0, 12, -100, 5, 7, 7, 1, -100, 3}, {9});
      Tensor g = red == Reduction::none ? test::random_tensor({9}, dt, 72) : full({}, 0.7, dt);
      CrossEntropyAttrs seen;
      Tensor a = cross_entropy(logits, targets, -100, red);
      Tensor b = cross_entropy_unchecked(logits, targets, -100, red);
      test::require_equal(b, a);
      test::require_equal(autograd::grad({b}, {logits}, {g})[0], autograd::grad({a}, {logits}, {g})[0]);
      REQUIRE(seen.fwd.size() == 2);
      REQUIRE_THAT(seen.fwd[0], ContainsSubstring("check_targets=true"));
      REQUIRE_THAT(seen.fwd[1], ContainsSubstring("check_targets=false"));
      REQUIRE(seen.bwd.size() == 2);
      for (const std::string& attrs : seen.bwd) REQUIRE_THAT(attrs, ContainsSubstring("check_targets=false"));
    }
  }
  // The CPU kernel checks even unchecked targets (it costs nothing there).
  REQUIRE_THROWS_WITH(cross_entropy_unchecked(test::random_tensor({4, 5}, DType::f32, 73),
                                              from_vector<int64_t>({0, 1, 5, 2}, {4})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("target 5 at row 2"));
}

TEST_CASE("cross_entropy rejects bad input", "[nn_ops]") {
  Tensor logits = test::random_tensor({4, 5}, DType::f32, 67);
  REQUIRE_THROWS_WITH(cross_entropy(logits, from_vector<int64_t>({0, 1, 5, 2}, {4})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("target 5 at row 2"));
  REQUIRE_THROWS_WITH(cross_entropy(logits, from_vector<int32_t>({0, -1, 1, 2}, {4})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("target -1 at row 1"));
  REQUIRE_THROWS_WITH(cross_entropy(logits, from_vector<int64_t>({0, 1, 2}, {3})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("(4,)"));
  REQUIRE_THROWS_WITH(cross_entropy_composite(logits, from_vector<int64_t>({0, 1, 2}, {3})),
                      ContainsSubstring("[cross_entropy]"));
  REQUIRE_THROWS_WITH(cross_entropy(logits, test::random_tensor({4}, DType::f32, 68)),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("i64 or i32"));
  REQUIRE_THROWS_WITH(cross_entropy(test::random_tensor({2, 2, 5}, DType::f32, 69), from_vector<int64_t>({0, 1}, {2})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("2-d"));
  REQUIRE_THROWS_WITH(cross_entropy(random_ids({4, 5}, 3, DType::i64, 70), from_vector<int64_t>({0, 1, 2, 0}, {4})),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("float"));
}

// ---------------------------------------------------------------- swiglu

TEST_CASE("swiglu fused and composite match a reference", "[nn_ops]") {
  const Shape shapes[] = {{3, 5, 7}, {1, 13}, {6}, {}, {2, 64}};
  for (DType dt : kFloats) {
    for (const Shape& s : shapes) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(s) << " noncontiguous " << nc);
        Tensor gate = mul(test::random_tensor(s, dt, 90, nc), 4.0);  // reaches into both tails of sigmoid
        Tensor up = test::random_tensor(s, dt, 91, nc);
        std::vector<double> gv = vals(gate), uv = vals(up), ref;
        for (size_t i = 0; i < gv.size(); ++i) ref.push_back(gv[i] / (1.0 + std::exp(-gv[i])) * uv[i]);
        Tensor fused = swiglu(gate, up);
        Tensor comp = swiglu_composite(gate, up);
        REQUIRE(fused.dtype() == dt);
        REQUIRE(fused.shape() == s);
        check_close(fused, f64_tensor(ref, s), dt);
        check_close(comp, f64_tensor(ref, s), dt);
      }
    }
  }
}

TEST_CASE("swiglu gradients match finite differences and the composite", "[nn_ops]") {
  for (bool nc : {false, true}) {
    INFO("noncontiguous " << nc);
    Tensor gate = mul(test::random_tensor({3, 2, 5}, DType::f64, 92, nc), 3.0).detach().set_requires_grad();
    Tensor up = test::random_tensor({3, 2, 5}, DType::f64, 93, nc).set_requires_grad();
    test::check_gradients([](const std::vector<Tensor>& in) { return swiglu(in[0], in[1]); }, {gate, up});
    test::check_gradients([](const std::vector<Tensor>& in) { return swiglu_composite(in[0], in[1]); }, {gate, up});
  }
  for (DType dt : kFloats) {
    INFO(dtype_name(dt));
    Tensor gate = test::random_tensor({9, 11}, dt, 94).set_requires_grad();
    Tensor up = test::random_tensor({9, 11}, dt, 95, true).set_requires_grad();
    Tensor g = test::random_tensor({9, 11}, dt, 96, true);
    std::vector<Tensor> fused = autograd::grad({swiglu(gate, up)}, {gate, up}, {g});
    std::vector<Tensor> comp = autograd::grad({swiglu_composite(gate, up)}, {gate, up}, {g});
    REQUIRE(fused[0].dtype() == dt);
    check_close(fused[0], comp[0], dt);
    check_close(fused[1], comp[1], dt);
  }
}

TEST_CASE("swiglu rejects bad input", "[nn_ops]") {
  Tensor gate = test::random_tensor({3, 4}, DType::f32, 97);
  REQUIRE_THROWS_WITH(swiglu(gate, test::random_tensor({3, 5}, DType::f32, 98)),
                      ContainsSubstring("[swiglu]") && ContainsSubstring("one shape"));
  REQUIRE_THROWS_WITH(swiglu(gate, test::random_tensor({4}, DType::f32, 98)), ContainsSubstring("[swiglu]"));
  REQUIRE_THROWS_WITH(swiglu(gate, test::random_tensor({3, 4}, DType::bf16, 99)),
                      ContainsSubstring("[swiglu]") && ContainsSubstring("dtype"));
  REQUIRE_THROWS_WITH(swiglu_composite(gate, test::random_tensor({3, 5}, DType::f32, 98)), ContainsSubstring("[swiglu]"));
  REQUIRE_THROWS_WITH(swiglu(random_ids({3, 4}, 5, DType::i64, 100), random_ids({3, 4}, 5, DType::i64, 101)),
                      ContainsSubstring("[swiglu]") && ContainsSubstring("float"));
}

TEST_CASE("second-order gradients through fused backward kernels fail clearly", "[nn_ops]") {
  // (saved inputs are detached, so only a cotangent that requires grad records the backward op)
  Tensor x = test::random_tensor({2, 3}, DType::f64, 71).set_requires_grad();
  Tensor w = test::random_tensor({3}, DType::f64, 72).set_requires_grad();
  Tensor r = test::random_tensor({2, 3}, DType::f64, 73).set_requires_grad();
  Tensor gx = autograd::grad({rms_norm(x, w, 1e-6)}, {x}, {r}, false, true)[0];
  REQUIRE_THROWS_WITH(autograd::grad({sum(gx)}, {r}), ContainsSubstring("rms_norm_composite"));
  Tensor l = test::random_tensor({2, 3}, DType::f64, 74).set_requires_grad();
  Tensor rl = test::random_tensor({}, DType::f64, 75).set_requires_grad();
  Tensor gl = autograd::grad({cross_entropy(l, from_vector<int64_t>({0, 2}, {2}))}, {l}, {rl}, false, true)[0];
  REQUIRE_THROWS_WITH(autograd::grad({sum(gl)}, {rl}), ContainsSubstring("cross_entropy_composite"));
  Tensor rs = test::random_tensor({2, 3}, DType::f64, 102).set_requires_grad();
  Tensor gs = autograd::grad({swiglu(x, r)}, {x}, {rs}, false, true)[0];
  REQUIRE_THROWS_WITH(autograd::grad({sum(gs)}, {rs}), ContainsSubstring("swiglu_composite"));
  // embedding's backward is linear in the gradient: its own vjp works
  Tensor e = test::random_tensor({4, 3}, DType::f64, 76).set_requires_grad();
  Tensor ids = from_vector<int64_t>({1, 1, 3}, {3});
  Tensor re = test::random_tensor({3, 3}, DType::f64, 77).set_requires_grad();
  Tensor ge = autograd::grad({embedding(e, ids)}, {e}, {re}, false, true)[0];
  Tensor gre = autograd::grad({ge}, {re}, {ones_like(ge)})[0];
  test::require_equal(gre, ones({3, 3}, DType::f64));
}

TEST_CASE("nn ops accept empty inputs", "[nn_ops]") {
  Tensor w = test::random_tensor({4, 3}, DType::f32, 78).set_requires_grad();
  Tensor ids = from_vector<int64_t>({}, {2, 0});
  Tensor e = embedding(w, ids);
  REQUIRE(e.shape() == Shape{2, 0, 3});
  test::require_equal(autograd::grad({sum(e)}, {w})[0], zeros({4, 3}));
  Tensor x = test::random_tensor({0, 5}, DType::f32, 79).set_requires_grad();
  Tensor nw = test::random_tensor({5}, DType::f32, 80).set_requires_grad();
  Tensor y = rms_norm(x, nw, 1e-5);
  REQUIRE(y.shape() == Shape{0, 5});
  test::require_equal(autograd::grad({sum(y)}, {nw})[0], zeros({5}));
  Tensor logits = test::random_tensor({0, 4}, DType::f32, 81);
  Tensor targets = from_vector<int64_t>({}, {0});
  test::require_equal(cross_entropy(logits, targets), zeros({}));
  REQUIRE(cross_entropy(logits, targets, -100, Reduction::none).shape() == Shape{0});
  Tensor sg = test::random_tensor({0, 3}, DType::f32, 103).set_requires_grad();
  REQUIRE(swiglu(sg, sg).shape() == Shape{0, 3});
  REQUIRE(autograd::grad({sum(swiglu(sg, sg))}, {sg})[0].shape() == Shape{0, 3});
  Tensor q = test::random_tensor({1, 2, 0, 4}, DType::f32, 82);
  Tensor kv = test::random_tensor({1, 1, 3, 4}, DType::f32, 83);
  REQUIRE(scaled_dot_product_attention(q, kv, kv).shape() == Shape{1, 2, 0, 4});
}

TEST_CASE("cross_entropy_loss_grad_ gives the loss and writes its gradient over the logits", "[nn_ops]") {
  const int64_t n = 6, v = 11;
  Tensor targets = ce_targets(n, v, -1, DType::i64, 67);  // some rows ignored (-1)
  for (const auto& [s, z] : {std::pair{0.0, 0.0}, std::pair{0.1, 0.0}, std::pair{0.2, 1e-2}}) {
    INFO("label_smoothing " << s << ", z_loss " << z);
    // The reference: the same loss written with composite ops, its gradient from autograd (f64).
    Tensor ref_logits = test::random_tensor({n, v}, DType::f64, 68).set_requires_grad();
    Tensor valid = ne(targets, -1.0);
    Tensor safe = where(valid, targets, scalar_tensor(0.0, DType::i64));
    Tensor lse = logsumexp(ref_logits, {1});
    Tensor nll = cross_entropy_composite(ref_logits, safe, -100, Reduction::none);
    Tensor per = add(add(mul(nll, 1.0 - s), mul(sub(lse, mean(ref_logits, {1})), s)), mul(square(lse), z));
    per = where(valid, per, scalar_tensor(0.0, DType::f64));
    const double scale = 0.37;
    Tensor want_grad = autograd::grad({mul(sum(per), scale)}, {ref_logits})[0];
    for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
      INFO(dtype_name(dt));
      Tensor logits = cast(ref_logits.detach(), dt);  // overwritten below
      Tensor rounded = cast(logits, DType::f64);
      Tensor loss = cross_entropy_loss_grad_(logits, targets, scalar_tensor(scale, DType::f64), -1, s, z);
      REQUIRE(loss.dtype() == compute_dtype(dt));
      const double tol = dt == DType::f64 ? 1e-12 : (dt == DType::f32 ? 1e-5 : 2e-2);
      if (dt == DType::f64) {
        test::require_close(loss, per.detach(), tol, tol);
        test::require_close(logits, want_grad, tol, tol);
      } else {  // against the reference evaluated at the rounded logits
        Tensor r = rounded.detach().set_requires_grad();
        Tensor lr = logsumexp(r, {1});
        Tensor pr = add(add(mul(cross_entropy_composite(r, safe, -100, Reduction::none), 1.0 - s),
                            mul(sub(lr, mean(r, {1})), s)),
                        mul(square(lr), z));
        pr = where(valid, pr, scalar_tensor(0.0, DType::f64));
        Tensor gr = autograd::grad({mul(sum(pr), scale)}, {r})[0];
        test::require_close(cast(loss, DType::f64), pr.detach(), 1e-5, 1e-6);
        test::require_close(cast(logits, DType::f64), gr, tol, 1e-3 * scale);
      }
    }
  }
  Tensor bad = test::random_tensor({3, 5}, DType::f32, 69);
  REQUIRE_THROWS_WITH(cross_entropy_loss_grad_(transpose(test::random_tensor({5, 3}, DType::f32, 70), 0, 1),
                                               from_vector<int64_t>({0, 1, 2}, {3}), scalar_tensor(1.0, DType::f32)),
                      ContainsSubstring("contiguous"));
  REQUIRE_THROWS_WITH(cross_entropy_loss_grad_(bad, from_vector<int64_t>({0, 1}, {2}), scalar_tensor(1.0, DType::f32)),
                      ContainsSubstring("targets must be (3,)"));
  REQUIRE_THROWS_WITH(cross_entropy_loss_grad_(bad, from_vector<int64_t>({0, 1, 9}, {3}), scalar_tensor(1.0, DType::f32)),
                      ContainsSubstring("out of range"));
}

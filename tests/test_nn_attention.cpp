// Tests of scaled_dot_product_attention: fused kernel vs composite vs a double-loop reference
// (causal with T != S, grouped kv heads, every float dtype, permuted views), the logsumexp output,
// f64 finite-difference gradients of both, and the errors.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>

#include "core/ops/attention.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

struct Config {
  int64_t b, hq, hkv, t, s, d, dv;
  bool causal;
};

// Shapes that exercise T != S both ways, GQA ratios 1/2/4, odd and large head dims.
const Config kConfigs[] = {
    {2, 2, 2, 5, 5, 8, 8, true},   {1, 4, 2, 3, 7, 16, 16, true}, {2, 4, 1, 6, 4, 12, 12, false},
    {1, 8, 2, 4, 9, 64, 64, true}, {1, 2, 1, 5, 3, 9, 9, true},   {1, 3, 3, 4, 6, 10, 5, false},
};

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

// out (B, Hq, T, Dv) and lse (B, Hq, T) in double; rows that see no key give 0 and -inf.
std::pair<Tensor, Tensor> sdpa_reference(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), s = k.size(2), dv = v.size(3), g = hq / hkv;
  std::vector<double> qv = vals(q), kv = vals(k), vv = vals(v);
  std::vector<double> out(static_cast<size_t>(b * hq * t * dv), 0.0), lse(static_cast<size_t>(b * hq * t));
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t h = 0; h < hq; ++h) {
      const int64_t kh = h / g;
      for (int64_t ti = 0; ti < t; ++ti) {
        const int64_t row = (bi * hq + h) * t + ti;
        std::vector<double> score;
        for (int64_t si = 0; si < s; ++si) {
          if (causal && si > ti + s - t) break;
          double acc = 0;
          for (int64_t j = 0; j < d; ++j) {
            acc += qv[static_cast<size_t>(row * d + j)] * kv[static_cast<size_t>(((bi * hkv + kh) * s + si) * d + j)];
          }
          score.push_back(acc * scale);
        }
        if (score.empty()) {
          lse[static_cast<size_t>(row)] = -INFINITY;
          continue;
        }
        double m = -INFINITY, l = 0;
        for (double x : score) m = std::max(m, x);
        for (double x : score) l += std::exp(x - m);
        lse[static_cast<size_t>(row)] = m + std::log(l);
        for (size_t si = 0; si < score.size(); ++si) {
          const double p = std::exp(score[si] - m) / l;
          for (int64_t j = 0; j < dv; ++j) {
            out[static_cast<size_t>(row * dv + j)] +=
                p * vv[static_cast<size_t>(((bi * hkv + kh) * s + static_cast<int64_t>(si)) * dv + j)];
          }
        }
      }
    }
  }
  return {from_vector<double>(out, {b, hq, t, dv}), from_vector<double>(lse, {b, hq, t})};
}

struct Tol {
  double rtol, atol;
};
Tol tol_for(DType d) {
  switch (d) {
    case DType::f64: return {1e-10, 1e-12};
    case DType::f32: return {1e-5, 1e-5};
    case DType::bf16: return {2e-2, 2e-2};
    default: return {4e-3, 4e-3};
  }
}

// q as a (B, T, Hq, D) buffer permuted to (B, Hq, T, D), the layout a projection produces.
Tensor permuted_q(const Config& c, DType dt, uint64_t seed) {
  return permute(test::random_tensor({c.b, c.t, c.hq, c.d}, dt, seed), {0, 2, 1, 3});
}

}  // namespace

TEST_CASE("attention fused and composite match a reference", "[nn_ops]") {
  for (const Config& c : kConfigs) {
    for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " B " << c.b << " Hq " << c.hq << " Hkv " << c.hkv << " T " << c.t << " S " << c.s
                            << " D " << c.d << " Dv " << c.dv << " causal " << c.causal << " nc " << nc);
        Tensor q = nc ? permuted_q(c, dt, 80) : test::random_tensor({c.b, c.hq, c.t, c.d}, dt, 80);
        Tensor k = test::random_tensor({c.b, c.hkv, c.s, c.d}, dt, 81, nc);
        Tensor v = test::random_tensor({c.b, c.hkv, c.s, c.dv}, dt, 82, nc);
        const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
        auto [ref, ref_lse] = sdpa_reference(q, k, v, c.causal, scale);
        const Tol tol = tol_for(dt);
        Tensor fused = scaled_dot_product_attention(q, k, v, c.causal);
        REQUIRE(fused.dtype() == dt);
        test::require_close(fused, ref, tol.rtol, tol.atol);
        test::require_close(scaled_dot_product_attention_composite(q, k, v, c.causal), ref, tol.rtol, tol.atol);
        // the primitive's second output: logsumexp in f32 (f64 for f64)
        auto outs = dispatch(std::make_shared<const prim::ScaledDotProductAttention>(c.causal, scale), {q, k, v});
        REQUIRE(outs[1].dtype() == (dt == DType::f64 ? DType::f64 : DType::f32));
        test::require_close(outs[1], ref_lse, dt == DType::f64 ? 1e-10 : 1e-5, dt == DType::f64 ? 1e-12 : 1e-5);
      }
    }
  }
  // an explicit scale
  Tensor q = test::random_tensor({1, 2, 3, 4}, DType::f64, 83);
  Tensor k = test::random_tensor({1, 1, 5, 4}, DType::f64, 84);
  Tensor v = test::random_tensor({1, 1, 5, 4}, DType::f64, 85);
  Tensor ref = sdpa_reference(q, k, v, false, 0.3).first;
  test::require_close(scaled_dot_product_attention(q, k, v, false, 0.3), ref, 1e-10, 1e-12);
  test::require_close(scaled_dot_product_attention_composite(q, k, v, false, 0.3), ref, 1e-10, 1e-12);
}

TEST_CASE("attention gradients match finite differences", "[nn_ops]") {
  const Config small[] = {{1, 4, 2, 3, 5, 6, 6, true}, {2, 2, 1, 4, 3, 5, 3, false}, {1, 2, 2, 4, 2, 4, 4, true}};
  for (const Config& c : small) {
    INFO("Hq " << c.hq << " Hkv " << c.hkv << " T " << c.t << " S " << c.s << " causal " << c.causal);
    Tensor q = permuted_q(c, DType::f64, 86).detach().set_requires_grad();
    Tensor k = test::random_tensor({c.b, c.hkv, c.s, c.d}, DType::f64, 87, true).set_requires_grad();
    Tensor v = test::random_tensor({c.b, c.hkv, c.s, c.dv}, DType::f64, 88).set_requires_grad();
    const bool causal = c.causal;
    test::check_gradients(
        [causal](const std::vector<Tensor>& in) { return scaled_dot_product_attention(in[0], in[1], in[2], causal); },
        {q, k, v});
    test::check_gradients(
        [causal](const std::vector<Tensor>& in) {
          return scaled_dot_product_attention_composite(in[0], in[1], in[2], causal);
        },
        {q, k, v});
    // the logsumexp output is differentiable too
    test::check_gradients(
        [causal](const std::vector<Tensor>& in) {
          auto outs = dispatch(std::make_shared<const prim::ScaledDotProductAttention>(causal, 0.7), in);
          return add(sum(outs[0], {3}), mul(where(ne(outs[1], -INFINITY), outs[1], zeros_like(outs[1])), 0.5));
        },
        {q, k, v});
  }
}

TEST_CASE("attention backward kernel matches the composite in every dtype", "[nn_ops]") {
  const Config c{2, 4, 1, 5, 7, 12, 12, true};
  for (DType dt : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    INFO(dtype_name(dt));
    Tensor q = test::random_tensor({c.b, c.hq, c.t, c.d}, dt, 89).set_requires_grad();
    Tensor k = test::random_tensor({c.b, c.hkv, c.s, c.d}, dt, 90).set_requires_grad();
    Tensor v = test::random_tensor({c.b, c.hkv, c.s, c.dv}, dt, 91).set_requires_grad();
    Tensor g = test::random_tensor({c.b, c.hq, c.t, c.dv}, dt, 92, true);
    std::vector<Tensor> fused = autograd::grad({scaled_dot_product_attention(q, k, v, true)}, {q, k, v}, {g});
    std::vector<Tensor> comp = autograd::grad({scaled_dot_product_attention_composite(q, k, v, true)}, {q, k, v}, {g});
    const Tol tol = tol_for(dt);
    for (size_t i = 0; i < 3; ++i) {
      INFO("input " << i);
      REQUIRE(fused[i].dtype() == dt);
      test::require_close(fused[i], comp[i], tol.rtol * 2, tol.atol * 4);  // dk/dv sum 4 heads x 5 queries
    }
  }
}

TEST_CASE("attention with the heads after the positions equals the (B, H, T, D) op, forward and backward", "[nn_ops]") {
  // heads_last takes q (B, T, Hq, D), k/v (B, S, Hkv, D) and returns (B, T, Hq, Dv): the same values as
  // the op on the transposed operands, gradients included, written in place of the layout copies.
  const Config cases[] = {{2, 4, 2, 5, 7, 8, 6, true}, {1, 3, 3, 6, 4, 4, 4, false}, {1, 2, 1, 6, 4, 4, 4, true}};
  for (const Config& c : cases) {
    for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
      INFO(dtype_name(dt) << " Hq " << c.hq << " Hkv " << c.hkv << " T " << c.t << " S " << c.s << " causal " << c.causal);
      Tensor q = test::random_tensor({c.b, c.t, c.hq, c.d}, dt, 110).set_requires_grad();
      Tensor k = test::random_tensor({c.b, c.s, c.hkv, c.d}, dt, 111).set_requires_grad();
      Tensor v = test::random_tensor({c.b, c.s, c.hkv, c.dv}, dt, 112).set_requires_grad();
      const Tensor g = test::random_tensor({c.b, c.t, c.hq, c.dv}, dt, 113);
      const Tensor got = scaled_dot_product_attention_heads_last(q, k, v, c.causal);
      REQUIRE(got.shape() == Shape{c.b, c.t, c.hq, c.dv});
      REQUIRE(got.is_contiguous());
      const Tensor want = transpose(
          scaled_dot_product_attention(transpose(q, 1, 2), transpose(k, 1, 2), transpose(v, 1, 2), c.causal), 1, 2);
      test::require_equal(got, contiguous(want));
      const std::vector<Tensor> dg = autograd::grad({got}, {q, k, v}, {g});
      const std::vector<Tensor> dw = autograd::grad({want}, {q, k, v}, {g});
      for (size_t i = 0; i < 3; ++i) {
        INFO("input " << i);
        REQUIRE(dg[i].is_contiguous());
        test::require_equal(dg[i], contiguous(dw[i]));
      }
    }
  }
  Tensor q = test::random_tensor({1, 5, 4, 6}, DType::f64, 114).set_requires_grad();
  Tensor k = test::random_tensor({1, 5, 2, 6}, DType::f64, 115, true).set_requires_grad();
  Tensor v = test::random_tensor({1, 5, 2, 6}, DType::f64, 116).set_requires_grad();
  test::check_gradients(
      [](const std::vector<Tensor>& in) { return scaled_dot_product_attention_heads_last(in[0], in[1], in[2], true); },
      {q, k, v});
  REQUIRE_THROWS_WITH(scaled_dot_product_attention_heads_last(test::random_tensor({5, 4, 6}, DType::f32, 117), k, v),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("(B, T, Hq, D)"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention_heads_last(test::random_tensor({1, 5, 3, 6}, DType::f64, 118), k, v),
                      ContainsSubstring("multiple"));
}

TEST_CASE("attention rejects bad input", "[nn_ops]") {
  Tensor q = test::random_tensor({1, 3, 4, 8}, DType::f32, 93);
  Tensor k = test::random_tensor({1, 2, 5, 8}, DType::f32, 94);
  Tensor v = test::random_tensor({1, 2, 5, 8}, DType::f32, 95);
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(q, k, v),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("multiple"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention_composite(q, k, v),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("multiple"));
  Tensor q2 = test::random_tensor({1, 4, 4, 8}, DType::f32, 96);
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(q2, test::random_tensor({1, 2, 5, 6}, DType::f32, 97), v),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("head dims"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(q2, k, test::random_tensor({1, 2, 6, 8}, DType::f32, 98)),
                      ContainsSubstring("[scaled_dot_product_attention]"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(q2, k, cast(v, DType::bf16)),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("dtype"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(test::random_tensor({4, 4, 8}, DType::f32, 99), k, v),
                      ContainsSubstring("[scaled_dot_product_attention]"));
  REQUIRE_THROWS_WITH(scaled_dot_product_attention(q2, test::random_tensor({2, 2, 5, 8}, DType::f32, 100), v),
                      ContainsSubstring("[scaled_dot_product_attention]") && ContainsSubstring("batch"));
}

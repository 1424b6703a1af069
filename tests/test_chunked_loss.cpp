// chunked_linear_loss on the CPU against the naive head (full logits + the same loss + autograd) for
// every ready-made loss and a user lambda, many chunk sizes, sum/mean, ignored tokens, frozen and
// trainable weight, bias, f64 finite differences, bf16, (B, T, H) input and input errors.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <random>
#include <string>

#include "autograd/engine.h"
#include "nn/chunked_loss.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

// Targets in [0, v) with ignore_index at every i % 5 == 2 and on the whole block [8, 16).
Tensor make_targets(int64_t n, int64_t v, uint64_t seed, int64_t ignore_index = -100) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const bool ignored = i % 5 == 2 || (i >= 8 && i < 16);
    t[static_cast<size_t>(i)] = ignored ? ignore_index : static_cast<int64_t>(rng() % static_cast<uint64_t>(v));
  }
  return from_vector<int64_t>(t, {n});
}

// The naive head: full logits, the same loss, masked sum, mean over non-ignored tokens (0 if none).
Tensor naive_loss(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                  const nn::LossFn& fn, Reduction red, int64_t ignore_index = -100) {
  const int64_t h = hidden.size(-1);
  const DType ldt = hidden.dtype() == DType::f64 ? DType::f64 : DType::f32;
  Tensor logits = matmul(reshape(hidden, {-1, h}), transpose(weight, 0, 1));  // (N, V)
  if (bias.defined()) logits = add(logits, bias);
  logits = cast(logits, ldt);
  Tensor t = reshape(targets, {-1});
  Tensor valid = ne(t, static_cast<double>(ignore_index));
  Tensor safe = where(valid, t, scalar_tensor(0.0, t.dtype()));
  Tensor total = sum(where(valid, cast(fn(logits, safe), ldt), scalar_tensor(0.0, ldt)));
  if (red == Reduction::sum) return total;
  const double count = sum(cast(valid, ldt)).item<double>();
  return mul(total, count > 0 ? 1.0 / count : 0.0);
}

struct Result {
  Tensor loss, dh, dw, db;
};

using Head = std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>;

// Runs head(hidden, weight, bias) on fresh leaves and backward; dw/db only when trainable.
Result run(const Head& head, const Tensor& hidden, const Tensor& weight, const Tensor& bias, bool trainable) {
  Tensor x = hidden.detach();
  x.set_requires_grad(true);
  Tensor w = weight.detach();
  w.set_requires_grad(trainable);
  Tensor b = bias.defined() ? bias.detach() : Tensor();
  if (b.defined()) b.set_requires_grad(trainable);
  Tensor loss = head(x, w, b);
  loss.backward();
  return {loss.detach(), x.grad(), w.grad(), b.defined() ? b.grad() : Tensor()};
}

void require_same(const Result& got, const Result& want, double rtol, double atol) {
  REQUIRE(got.loss.dim() == 0);
  test::require_close(got.loss, want.loss, rtol, atol);
  REQUIRE(got.dh.defined());
  test::require_close(got.dh, want.dh, rtol, atol);
  REQUIRE(got.dw.defined() == want.dw.defined());
  if (want.dw.defined()) test::require_close(got.dw, want.dw, rtol, atol);
  REQUIRE(got.db.defined() == want.db.defined());
  if (want.db.defined()) test::require_close(got.db, want.db, rtol, atol);
}

// Brier score: a user loss written with kiln ops, no gather needed.
Tensor brier(const Tensor& logits, const Tensor& targets) {
  const int64_t v = logits.size(1);
  Tensor onehot = eq(unsqueeze(arange(v, DType::i64, logits.device()), 0), unsqueeze(cast(targets, DType::i64), 1));  // (n, V)
  return sum(square(sub(softmax(logits, 1), cast(onehot, logits.dtype()))), {1});
}

struct NamedLoss {
  std::string name;
  nn::LossFn fn;
};

std::vector<NamedLoss> all_losses() {
  return {
      {"cross_entropy", nn::cross_entropy_loss()},
      {"label_smoothing", nn::cross_entropy_loss({.label_smoothing = 0.1})},
      {"ce+z_loss", nn::cross_entropy_loss({.label_smoothing = 0.05, .z_loss_weight = 1e-2})},
      {"z_loss", nn::z_loss(1e-1)},
      {"focal", nn::focal_loss(2.0)},
      {"lambda_brier", brier},
  };
}

}  // namespace

TEST_CASE("chunked_linear_loss equals the naive head for every loss, chunk size and reduction", "[chunked_loss]") {
  const int64_t n = 37, h = 8, v = 23;
  Tensor hidden = test::random_tensor({n, h}, DType::f32, 1);
  Tensor weight = test::random_tensor({v, h}, DType::f32, 2);
  Tensor bias = test::random_tensor({v}, DType::f32, 3);
  Tensor targets = make_targets(n, v, 4);
  const size_t five_tokens = nn::chunked_loss_bytes_per_token(v, DType::f32) * 5;
  for (const NamedLoss& loss : all_losses()) {
    for (Reduction red : {Reduction::mean, Reduction::sum}) {
      for (bool trainable : {true, false}) {
        const Result want = run(
            [&](const Tensor& x, const Tensor& w, const Tensor& b) { return naive_loss(x, w, b, targets, loss.fn, red); },
            hidden, weight, bias, trainable);
        for (int64_t chunk : {int64_t{1}, int64_t{3}, int64_t{7}, n - 1, n, n + 9, int64_t{0}}) {
          CAPTURE(loss.name, red == Reduction::mean, trainable, chunk);
          nn::ChunkedLossOptions opt;
          opt.reduction = red;
          opt.chunk_size = chunk;
          opt.memory_budget_bytes = five_tokens;  // automatic: 5 tokens per chunk; gradient groups of 25
          const Result got = run(
              [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                nn::ChunkedLossOptions o = opt;
                o.bias = b;
                return nn::chunked_linear_loss(x, w, targets, loss.fn, o);
              },
              hidden, weight, bias, trainable);
          require_same(got, want, 1e-4, 1e-5);  // f32, summed in another order
        }
      }
    }
  }
}

TEST_CASE("chunked_linear_loss: cross-entropy matches torch semantics (ignore_index, label smoothing, z-loss)",
          "[chunked_loss]") {
  const int64_t n = 29, h = 6, v = 17;
  const double s = 0.15, z = 3e-2;
  Tensor hidden = test::random_tensor({n, h}, DType::f32, 11);
  Tensor weight = test::random_tensor({v, h}, DType::f32, 12);
  Tensor targets = make_targets(n, v, 13, /*ignore_index=*/7);
  nn::ChunkedLossOptions opt;
  opt.ignore_index = 7;
  opt.chunk_size = 4;
  Tensor got = nn::chunked_linear_loss(hidden, weight, targets, nn::cross_entropy_loss({s, z}), opt);
  // Reference in double from the definition: (1 - s) * nll + s * mean_j(-log p_j) + z * lse^2.
  const std::vector<float> x = hidden.to_vector<float>(), w = weight.to_vector<float>();
  const std::vector<int64_t> t = targets.to_vector<int64_t>();
  double total = 0;
  int count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (t[static_cast<size_t>(i)] == 7) continue;
    std::vector<double> logit(static_cast<size_t>(v));
    double mx = -1e300;
    for (int64_t j = 0; j < v; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < h; ++k) acc += double(x[size_t(i * h + k)]) * double(w[size_t(j * h + k)]);
      logit[size_t(j)] = acc;
      mx = std::max(mx, acc);
    }
    double se = 0, mean_logit = 0;
    for (double l : logit) se += std::exp(l - mx), mean_logit += l / double(v);
    const double lse = mx + std::log(se);
    const double nll = lse - logit[size_t(t[size_t(i)])];
    total += (1 - s) * nll + s * (lse - mean_logit) + z * lse * lse;
    ++count;
  }
  REQUIRE(count > 0);
  REQUIRE(got.dtype() == DType::f32);
  REQUIRE(std::abs(got.item<double>() - total / count) <= 1e-5 * std::abs(total / count));
  // Focal loss with gamma = 0 is cross-entropy; with gamma > 0 it is smaller.
  opt.chunk_size = 5;
  const double ce = nn::chunked_linear_loss(hidden, weight, targets, nn::cross_entropy_loss(), opt).item<double>();
  const double f0 = nn::chunked_linear_loss(hidden, weight, targets, nn::focal_loss(0.0), opt).item<double>();
  const double f2 = nn::chunked_linear_loss(hidden, weight, targets, nn::focal_loss(2.0), opt).item<double>();
  REQUIRE(std::abs(f0 - ce) <= 1e-6 * ce);
  REQUIRE(f2 < ce);
  REQUIRE(f2 > 0.0);
}

TEST_CASE("chunked_linear_loss: all-ignored chunks and all-ignored batches", "[chunked_loss]") {
  const int64_t n = 12, h = 5, v = 11;
  Tensor hidden = test::random_tensor({n, h}, DType::f32, 21);
  Tensor weight = test::random_tensor({v, h}, DType::f32, 22);
  Tensor bias = test::random_tensor({v}, DType::f32, 23);
  Tensor none = full({n}, -100.0, DType::i64);
  for (Reduction red : {Reduction::mean, Reduction::sum}) {
    for (int64_t chunk : {int64_t{1}, int64_t{5}, int64_t{0}}) {
      CAPTURE(chunk, red == Reduction::mean);
      const Result got = run(
          [&](const Tensor& x, const Tensor& w, const Tensor& b) {
            nn::ChunkedLossOptions o;
            o.bias = b;
            o.reduction = red;
            o.chunk_size = chunk;
            return nn::chunked_linear_loss(x, w, none, nn::cross_entropy_loss({.label_smoothing = 0.1}), o);
          },
          hidden, weight, bias, true);
      // Mean over zero tokens is defined as 0 with zero gradients.
      test::require_equal(got.loss, zeros({}));
      test::require_equal(got.dh, zeros({n, h}));
      test::require_equal(got.dw, zeros({v, h}));
      test::require_equal(got.db, zeros({v}));
    }
  }
  // One valid token in the last chunk: the mean is that token's loss.
  std::vector<int64_t> tv(static_cast<size_t>(n), -100);
  tv.back() = 4;
  Tensor one = from_vector<int64_t>(tv, {n});
  nn::ChunkedLossOptions o;
  o.chunk_size = 5;
  Tensor got = nn::chunked_linear_loss(hidden, weight, one, nn::cross_entropy_loss(), o);
  Tensor want = naive_loss(hidden, weight, Tensor(), one, nn::cross_entropy_loss(), Reduction::sum);
  test::require_close(got, want, 1e-5, 1e-6);
}

TEST_CASE("chunked_linear_loss: a frozen weight computes no weight gradient", "[chunked_loss]") {
  const int64_t n = 37, h = 8, v = 19, chunk = 5;
  Tensor hidden = test::random_tensor({n, h}, DType::f32, 31);
  Tensor weight = test::random_tensor({v, h}, DType::f32, 32);
  std::vector<int64_t> tv;
  for (int64_t i = 0; i < n; ++i) tv.push_back((i * 7) % v);
  Tensor targets = from_vector<int64_t>(tv, {n});
  nn::ChunkedLossOptions o;
  o.chunk_size = chunk;
  o.memory_budget_bytes = size_t{v} * 4 * 10;  // gradient groups of 10 tokens (trainable weight)
  REQUIRE(nn::chunked_loss_group_size(v, DType::f32, o.memory_budget_bytes, chunk) == 10);
  Tensor x = hidden.detach();
  x.set_requires_grad(true);
  test::OpCounter counter;
  Tensor loss = nn::chunked_linear_loss(x, weight, targets, nn::cross_entropy_loss(), o);
  loss.backward();
  const int chunks = static_cast<int>((n + chunk - 1) / chunk), groups = static_cast<int>((n + 9) / 10);
  REQUIRE(counter.count("matmul") == 2 * chunks);  // logits and d(hidden) per chunk, no weight work
  REQUIRE_FALSE(weight.grad().defined());
  // With the weight trainable there are more products (the weight gradient by groups).
  test::OpCounter counter2;
  Tensor w = weight.detach();
  w.set_requires_grad(true);
  nn::chunked_linear_loss(x, w, targets, nn::cross_entropy_loss(), o).backward();
  REQUIRE(counter2.count("matmul") > chunks + groups);  // logits per chunk; d(hidden), d(weight) per group
  REQUIRE(w.grad().defined());
}

TEST_CASE("chunked_linear_loss: f64 finite differences", "[chunked_loss]") {
  const int64_t n = 7, h = 3, v = 5;
  Tensor hidden = test::random_tensor({n, h}, DType::f64, 41).set_requires_grad(true);
  Tensor weight = test::random_tensor({v, h}, DType::f64, 42).set_requires_grad(true);
  Tensor bias = test::random_tensor({v}, DType::f64, 43).set_requires_grad(true);
  Tensor targets = from_vector<int64_t>({1, -100, 4, 0, 2, -100, 3}, {n});
  for (const NamedLoss& loss : all_losses()) {
    for (Reduction red : {Reduction::mean, Reduction::sum}) {
      CAPTURE(loss.name);
      test::check_gradients(
          [&](const std::vector<Tensor>& in) {
            nn::ChunkedLossOptions o;
            o.bias = in[2];
            o.chunk_size = 3;
            o.reduction = red;
            Tensor out = nn::chunked_linear_loss(in[0], in[1], targets, loss.fn, o);
            REQUIRE(out.dtype() == DType::f64);
            return out;
          },
          {hidden, weight, bias});
    }
  }
}

TEST_CASE("chunked_linear_loss: bf16 inputs compute in f32 within a chunk", "[chunked_loss]") {
  const int64_t n = 33, h = 16, v = 41;
  Tensor hidden = test::random_tensor({n, h}, DType::bf16, 51);
  Tensor weight = cast(mul(test::random_tensor({v, h}, DType::f32, 52), 0.25), DType::bf16);  // logits ~ N(0, 1)
  Tensor bias = test::random_tensor({v}, DType::bf16, 53);
  Tensor targets = make_targets(n, v, 54);
  for (const NamedLoss& loss : all_losses()) {
    CAPTURE(loss.name);
    const Head chunked = [&](const Tensor& x, const Tensor& w, const Tensor& b) {
      nn::ChunkedLossOptions o;
      o.bias = b;
      o.chunk_size = 6;
      o.memory_budget_bytes = size_t{v} * 2 * 12;  // gradient groups of 12 tokens
      return nn::chunked_linear_loss(x, w, targets, loss.fn, o);
    };
    const Result got = run(chunked, hidden, weight, bias, true);
    REQUIRE(got.loss.dtype() == DType::f32);
    REQUIRE(got.dh.dtype() == DType::bf16);
    REQUIRE(got.dw.dtype() == DType::bf16);
    // Against the naive head in bf16 (same roundings; the weight gradient is summed in f32 here).
    const Result naive = run(
        [&](const Tensor& x, const Tensor& w, const Tensor& b) {
          return naive_loss(x, w, b, targets, loss.fn, Reduction::mean);
        },
        hidden, weight, bias, true);
    require_same(got, naive, 2e-2, 2e-3);
    // Against the f32 head on the same (bf16-representable) values.
    const Result f32 = run(
        [&](const Tensor& x, const Tensor& w, const Tensor& b) {
          return naive_loss(x, w, b, targets, loss.fn, Reduction::mean);
        },
        cast(hidden, DType::f32), cast(weight, DType::f32), cast(bias, DType::f32), true);
    test::require_close(got.loss, f32.loss, 1e-2, 1e-3);
    // bf16 rounding of the logits moves single gradient entries a lot: compare relative norms.
    const auto rel_err = [](const Tensor& a, const Tensor& ref) {
      return std::sqrt(sum(square(sub(cast(a, DType::f32), ref))).item<double>() / sum(square(ref)).item<double>());
    };
    REQUIRE(rel_err(got.dh, f32.dh) < 5e-2);
    REQUIRE(rel_err(got.dw, f32.dw) < 5e-2);
  }
}

TEST_CASE("chunked_linear_loss: (B, T, H) input, non-contiguous inputs, non-leaf hidden, upstream scale",
          "[chunked_loss]") {
  const int64_t b = 3, t = 5, h = 7, v = 13;
  Tensor hidden = test::random_tensor({b, t, h}, DType::f32, 61, /*noncontiguous=*/true);
  Tensor weight = test::random_tensor({v, h}, DType::f32, 62, /*noncontiguous=*/true);
  REQUIRE_FALSE(hidden.is_contiguous());
  Tensor targets = reshape(make_targets(b * t, v, 63), {b, t});
  const nn::LossFn fn = nn::cross_entropy_loss({.label_smoothing = 0.2});
  nn::ChunkedLossOptions o;
  o.chunk_size = 4;
  // hidden is the output of an op (1.5 * x); the loss is scaled by 2.5 downstream.
  Tensor x = hidden.detach();
  x.set_requires_grad(true);
  Tensor w = weight.detach();
  w.set_requires_grad(true);
  Tensor loss = nn::chunked_linear_loss(mul(x, 1.5), w, targets, fn, o);
  mul(loss, 2.5).backward();
  REQUIRE(x.grad().shape() == Shape{b, t, h});
  Tensor x2 = contiguous(hidden).detach();
  x2.set_requires_grad(true);
  Tensor w2 = contiguous(weight).detach();
  w2.set_requires_grad(true);
  Tensor want = naive_loss(mul(x2, 1.5), w2, Tensor(), targets, fn, Reduction::mean);
  mul(want, 2.5).backward();
  test::require_close(loss, want, 1e-4, 1e-5);
  test::require_close(x.grad(), x2.grad(), 1e-4, 1e-5);
  test::require_close(w.grad(), w2.grad(), 1e-4, 1e-5);
  // Flat targets (N) work too, and i32 targets.
  Tensor flat = nn::chunked_linear_loss(hidden, weight, cast(reshape(targets, {b * t}), DType::i32), fn, o);
  autograd::NoGradGuard no_grad;
  test::require_close(flat, naive_loss(hidden, weight, Tensor(), targets, fn, Reduction::mean), 1e-4, 1e-5);
  // Under no_grad: the loss only, no history.
  Tensor ng = nn::chunked_linear_loss(x, w, targets, fn, o);
  REQUIRE_FALSE(ng.requires_grad());
  test::require_close(ng, naive_loss(x, w, Tensor(), targets, fn, Reduction::mean), 1e-4, 1e-5);
}

TEST_CASE("chunked_linear_loss: overwrite_hidden writes d(hidden) over hidden, with the same gradients",
          "[chunked_loss]") {
  // 23 tokens, chunks of 4 (the last short), chunks 2 and 3 all ignored (make_targets).
  const int64_t n = 23, h = 6, v = 17;
  const Tensor x0 = test::random_tensor({n, h}, DType::f32, 71);
  const Tensor w0 = test::random_tensor({v, h}, DType::f32, 72);
  const Tensor targets = make_targets(n, v, 73);
  // the fused cross-entropy and the generic path; a frozen and a trainable weight (its group of 8 tokens
  // spans chunks)
  for (const bool fused : {true, false}) {
    for (const bool trainable : {false, true}) {
      CAPTURE(fused, trainable);
      const nn::LossFn fn = fused ? nn::cross_entropy_loss() : nn::focal_loss(2.0);
      nn::ChunkedLossOptions o;
      o.chunk_size = 4;
      o.memory_budget_bytes = static_cast<size_t>(8 * v * 4);  // groups of 8 tokens (f32)
      const auto step = [&](bool overwrite, Tensor* hidden_out) {
        Tensor x = x0.detach().set_requires_grad(true);
        Tensor w = w0.detach().set_requires_grad(trainable);
        Tensor hidden = mul(x, 1.5);  // (n, h), made by an op
        if (hidden_out) *hidden_out = hidden;
        nn::ChunkedLossOptions oo = o;
        oo.overwrite_hidden = overwrite;
        Tensor loss = nn::chunked_linear_loss(hidden, w, targets, fn, oo);
        mul(loss, 2.5).backward();
        return std::vector<Tensor>{loss, x.grad(), trainable ? w.grad() : Tensor()};
      };
      const std::vector<Tensor> want = step(false, nullptr);
      Tensor hidden;
      const std::vector<Tensor> got = step(true, &hidden);
      test::require_close(got[0], want[0], 1e-6, 1e-7);
      test::require_close(got[1], want[1], 1e-6, 1e-7);
      if (trainable) test::require_close(got[2], want[2], 1e-6, 1e-7);
      // hidden's memory now holds d(loss)/d(hidden), 2.5 * d(chunked)/d(hidden): x's gradient over 1.5
      test::require_close(hidden, mul(want[1], 1.0 / 1.5), 1e-6, 1e-7);
    }
  }
  // A leaf or a non-contiguous hidden keeps its values (a new buffer, as without the option).
  nn::ChunkedLossOptions o;
  o.chunk_size = 4;
  o.overwrite_hidden = true;
  Tensor leaf = x0.clone().set_requires_grad(true);
  nn::chunked_linear_loss(leaf, w0, targets, nn::cross_entropy_loss(), o).backward();
  test::require_equal(leaf, x0);
  Tensor xt = test::random_tensor({h, n}, DType::f32, 74).set_requires_grad(true);
  Tensor ht = transpose(mul(xt, 1.0), 0, 1);  // (n, h), not contiguous
  const Tensor ht_before = ht.detach().clone();
  nn::chunked_linear_loss(ht, w0, targets, nn::cross_entropy_loss(), o).backward();
  test::require_equal(ht.detach(), ht_before);
  // An op that saved hidden for its backward finds it changed: a clear error, not a wrong gradient.
  Tensor x = x0.detach().set_requires_grad(true);
  Tensor hidden = mul(x, 1.5);
  Tensor both = add(nn::chunked_linear_loss(hidden, w0, targets, nn::cross_entropy_loss(), o), sum(mul(hidden, hidden)));
  REQUIRE_THROWS_WITH(both.backward(), ContainsSubstring("modified in place"));
}

TEST_CASE("chunked_linear_loss: automatic chunk size from the memory budget", "[chunked_loss]") {
  const size_t gib = size_t{1} << 30;
  const int64_t v = 128256;
  REQUIRE(nn::chunked_loss_bytes_per_token(v, DType::bf16) == size_t(v) * (2 * 2 + 3 * 4));
  const int64_t c = nn::chunked_loss_chunk_size(v, DType::bf16, gib);
  REQUIRE(c % 64 == 0);
  REQUIRE(size_t(c) * nn::chunked_loss_bytes_per_token(v, DType::bf16) <= gib);
  REQUIRE(size_t(c + 64) * nn::chunked_loss_bytes_per_token(v, DType::bf16) > gib);
  const int64_t g = nn::chunked_loss_group_size(v, DType::bf16, gib, c);
  REQUIRE(g % c == 0);
  REQUIRE(size_t(g) * v * 2 <= gib);
  REQUIRE(size_t(g + c) * v * 2 > gib);
  REQUIRE(nn::chunked_loss_chunk_size(v, DType::f32, 1) == 1);  // never below one token
  REQUIRE(nn::chunked_loss_group_size(v, DType::f32, 1, 3) == 3);  // never below one chunk
  const size_t per = nn::chunked_loss_bytes_per_token(100, DType::f32);
  REQUIRE(nn::chunked_loss_chunk_size(100, DType::f32, per * 17) == 17);
  REQUIRE(nn::chunked_loss_chunk_size(100, DType::f32, per * 130) == 128);
  // the fused cross-entropy holds one row of logits per token, in the compute dtype
  REQUIRE(nn::chunked_loss_bytes_per_token(v, DType::bf16, true) == size_t(v) * 2);
  REQUIRE(nn::chunked_loss_chunk_size(v, DType::bf16, gib, true) == 4160);  // 4186 rounded down to 64s
  REQUIRE(nn::chunked_loss_chunk_size(v, DType::bf16, size_t{128} << 20, true) == 512);
}

TEST_CASE("chunked_linear_loss: bad inputs", "[chunked_loss]") {
  const int64_t n = 6, h = 4, v = 9;
  Tensor x = test::random_tensor({n, h}, DType::f32, 71);
  Tensor w = test::random_tensor({v, h}, DType::f32, 72);
  Tensor t = from_vector<int64_t>({0, 1, 2, 3, -100, 8}, {n});
  const nn::LossFn ce = nn::cross_entropy_loss();
  const auto fails = [](const std::function<void()>& f) {
    REQUIRE_THROWS_WITH(f(), ContainsSubstring("[chunked_linear_loss]"));
  };
  fails([&] { nn::chunked_linear_loss(x, test::random_tensor({v, h + 1}, DType::f32, 73), t, ce); });
  fails([&] { nn::chunked_linear_loss(x, cast(w, DType::bf16), t, ce); });
  fails([&] { nn::chunked_linear_loss(x, w, cast(t, DType::f32), ce); });
  fails([&] { nn::chunked_linear_loss(x, w, from_vector<int64_t>({0, 1, 2}, {3}), ce); });
  fails([&] { nn::chunked_linear_loss(x, w, from_vector<int64_t>({0, 1, 2, 9, 4, 5}, {n}), ce); });  // 9 >= V
  fails([&] { nn::chunked_linear_loss(x, w, from_vector<int64_t>({0, 1, -1, 3, 4, 5}, {n}), ce); });
  fails([&] { nn::chunked_linear_loss(select(x, 0, 0), w, from_vector<int64_t>({0}, {1}), ce); });
  fails([&] { nn::chunked_linear_loss(x, w, t, nn::LossFn()); });
  fails([&] {
    nn::ChunkedLossOptions o;
    o.chunk_size = -1;
    nn::chunked_linear_loss(x, w, t, ce, o);
  });
  fails([&] {
    nn::ChunkedLossOptions o;
    o.bias = test::random_tensor({v + 1}, DType::f32, 74);
    nn::chunked_linear_loss(x, w, t, ce, o);
  });
  fails([&] {  // a loss that reduces the chunk itself breaks the per-token contract
    nn::chunked_linear_loss(x, w, t, [&](const Tensor& l, const Tensor& tt) { return sum(ce(l, tt)); });
  });
  REQUIRE_THROWS_WITH(nn::focal_loss(0.5), ContainsSubstring("[focal_loss]"));
  REQUIRE_THROWS_WITH(nn::cross_entropy_loss({.label_smoothing = 1.5}), ContainsSubstring("[cross_entropy_loss]"));
}

TEST_CASE("chunked_linear_loss: ready-made losses skip the per-chunk device target check", "[chunked_loss]") {
  // The head checks the targets once on the host (bad ones fail above), so its cross-entropy calls
  // are cross_entropy_unchecked: no CUDA stream synchronisation per chunk.
  struct Attrs : DispatchObserver {
    std::vector<std::string> seen;
    ObserverScope scope{this};
    void on_op(const Primitive& op, const std::vector<Tensor>&, const std::vector<Tensor>&) override {
      if (std::string(op.name()).rfind("cross_entropy", 0) == 0) seen.push_back(op.attributes());
    }
  };
  const int64_t n = 40, h = 8, v = 17;
  Tensor x = test::random_tensor({n, h}, DType::f32, 81).set_requires_grad();
  Tensor w = test::random_tensor({v, h}, DType::f32, 82);
  const Tensor t = make_targets(n, v, 83);
  for (const nn::LossFn& fn : {nn::cross_entropy_loss(), nn::cross_entropy_loss({.label_smoothing = 0.1}),
                               nn::focal_loss(2.0)}) {
    nn::ChunkedLossOptions o;
    o.chunk_size = 7;
    Attrs a;
    nn::chunked_linear_loss(x, w, t, fn, o).backward();
    // cross-entropy: one fused loss-and-gradient op per live chunk (it never checks targets); focal:
    // forward and backward of every live chunk, unchecked
    REQUIRE(a.seen.size() >= 4);
    for (const std::string& s : a.seen) {
      const bool fused = s.find("label_smoothing=") != std::string::npos;
      if (!fused) REQUIRE_THAT(s, ContainsSubstring("check_targets=false"));
    }
    x.zero_grad();
  }
}

TEST_CASE("chunked_linear_loss: the built-in cross-entropy's fused path equals the generic path", "[chunked_loss]") {
  // cross_entropy_loss() is recognised and fused; the same function behind a lambda is not.
  const int64_t n = 45, h = 12, v = 23;
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    Tensor hidden = test::random_tensor({n, h}, dt, 91);
    Tensor weight = cast(mul(test::random_tensor({v, h}, DType::f32, 92), 0.3), dt);
    Tensor bias = test::random_tensor({v}, dt, 93);
    for (const nn::CrossEntropyOptions& co : {nn::CrossEntropyOptions{}, nn::CrossEntropyOptions{.label_smoothing = 0.1},
                                              nn::CrossEntropyOptions{.label_smoothing = 0.05, .z_loss_weight = 1e-2}}) {
      const nn::LossFn fused = nn::cross_entropy_loss(co);
      const nn::LossFn generic = [fused](const Tensor& l, const Tensor& t) { return fused(l, t); };
      for (Reduction red : {Reduction::mean, Reduction::sum}) {
        for (int64_t chunk : {int64_t{4}, int64_t{16}, int64_t{64}}) {
          for (bool trainable : {false, true}) {
            for (bool with_bias : {false, true}) {
              CAPTURE(dtype_name(dt), co.label_smoothing, co.z_loss_weight, static_cast<int>(red), chunk, trainable,
                      with_bias);
              Tensor targets = make_targets(n, v, 94 + static_cast<uint64_t>(chunk), -7);
              const auto head = [&](const nn::LossFn& fn) {
                return [&, fn](const Tensor& x, const Tensor& w, const Tensor& b) {
                  nn::ChunkedLossOptions o;
                  o.bias = b;
                  o.chunk_size = chunk;
                  o.reduction = red;
                  o.ignore_index = -7;
                  return nn::chunked_linear_loss(x, w, targets, fn, o);
                };
              };
              test::OpCounter ops;
              const Result got = run(head(fused), hidden, weight, with_bias ? bias : Tensor(), trainable);
              REQUIRE(ops.count("cross_entropy_loss_grad") > 0);
              REQUIRE(ops.count("cross_entropy") == 0);
              const Result want = run(head(generic), hidden, weight, with_bias ? bias : Tensor(), trainable);
              if (dt != DType::bf16) {
                const double tol = dt == DType::f64 ? 1e-11 : 2e-5;
                require_same(got, want, tol, tol);
                continue;
              }
              // bf16: the fused path keeps the logits and their gradient in bf16 and sums d(weight)
              // in bf16 chunk by chunk (the generic path: f32): compare relative norms.
              test::require_close(got.loss, want.loss, 1e-2, 1e-3);
              const auto rel_err = [](const Tensor& a, const Tensor& ref) {
                const Tensor r = cast(ref, DType::f32);
                return std::sqrt(sum(square(sub(cast(a, DType::f32), r))).item<double>() /
                                 std::max(sum(square(r)).item<double>(), 1e-30));
              };
              REQUIRE(rel_err(got.dh, want.dh) < 3e-2);
              if (trainable) REQUIRE(rel_err(got.dw, want.dw) < 3e-2);
              if (trainable && with_bias) REQUIRE(rel_err(got.db, want.db) < 3e-2);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("chunked_linear_loss: a second backward through one loss is refused, not wrongly scaled", "[chunked_loss]") {
  const int64_t n = 9, h = 4, v = 7;
  Tensor x = test::random_tensor({n, h}, DType::f32, 95).set_requires_grad();
  Tensor w = test::random_tensor({v, h}, DType::f32, 96);
  const Tensor t = make_targets(n, v, 97);
  for (const nn::LossFn& fn : {nn::cross_entropy_loss(), nn::focal_loss(2.0)}) {
    Tensor loss = mul(nn::chunked_linear_loss(x, w, t, fn), 3.0);
    loss.backward({}, /*retain_graph=*/true);
    const Tensor first = x.grad().clone();
    REQUIRE_THROWS_WITH(loss.backward({}, true), ContainsSubstring("second backward"));
    test::require_close(x.grad(), first, 0, 0);  // nothing was added by the refused backward
    x.zero_grad();
  }
}

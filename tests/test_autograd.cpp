// Autograd engine tests on small graphs of public ops: hand-derived gradients, accumulation, grad
// modes, retain_graph/create_graph, in-place checks, custom Functions, checkpointing, error cases;
// plus a few checks of the test helpers themselves.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "autograd/checkpoint.h"
#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/memory.h"
#include "core/ops.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

Tensor f64(const std::vector<double>& values, const Shape& shape) { return from_vector<double>(values, shape); }

Tensor leaf(const std::vector<double>& values, const Shape& shape) {
  Tensor t = f64(values, shape);
  t.set_requires_grad(true);
  return t;
}

Tensor random_leaf(const Shape& shape, uint64_t seed) {
  Tensor t = test::random_tensor(shape, DType::f64, seed);
  t.set_requires_grad(true);
  return t;
}

std::vector<double> values(const Tensor& t) { return cast(t, DType::f64).to_vector<double>(); }

void require_grad_values(const Tensor& x, const std::vector<double>& expected) {
  REQUIRE(x.grad().defined());
  test::require_close(x.grad(), f64(expected, x.shape()), 1e-12, 1e-12);
}

// The name the op run by `fn` reports to observers (the last op it dispatched).
template <class Fn> std::string op_name(Fn&& fn) {
  test::OpCounter c;
  fn();
  REQUIRE(!c.names.empty());
  return c.names.back();
}

}  // namespace

TEST_CASE("autograd: leaf gradients match hand-derived values", "[autograd]") {
  SECTION("sum(x * y + exp(x))") {
    Tensor x = leaf({0.5, -1.0, 2.0}, {3});
    Tensor y = leaf({3.0, 0.25, -2.0}, {3});
    sum(x * y + exp(x)).backward();
    require_grad_values(x, {3.0 + std::exp(0.5), 0.25 + std::exp(-1.0), -2.0 + std::exp(2.0)});
    require_grad_values(y, {0.5, -1.0, 2.0});
  }
  SECTION("sum(a @ b) over a (2, 3) and b (3, 4)") {
    Tensor a = random_leaf({2, 3}, 1), b = random_leaf({3, 4}, 2);
    sum(matmul(a, b)).backward();
    std::vector<double> av = values(a), bv = values(b), ga(6), gb(12);
    for (int i = 0; i < 2; ++i)
      for (int k = 0; k < 3; ++k)
        for (int j = 0; j < 4; ++j) {
          ga[static_cast<size_t>(i * 3 + k)] += bv[static_cast<size_t>(k * 4 + j)];  // dL/da[i,k] = sum_j b[k,j]
          gb[static_cast<size_t>(k * 4 + j)] += av[static_cast<size_t>(i * 3 + k)];  // dL/db[k,j] = sum_i a[i,k]
        }
    require_grad_values(a, ga);
    require_grad_values(b, gb);
  }
  SECTION("broadcast operands get gradients of their own shape") {
    Tensor x = leaf({1.0, 2.0, 3.0}, {3, 1});
    Tensor y = leaf({1.0, -1.0, 0.5, 2.0}, {1, 4});
    sum(x * y).backward();  // dL/dx[i] = sum_j y[j], dL/dy[j] = sum_i x[i]
    require_grad_values(x, {2.5, 2.5, 2.5});
    require_grad_values(y, {6.0, 6.0, 6.0, 6.0});
  }
  SECTION("mean and a float32 leaf keep the leaf's dtype") {
    Tensor x = from_vector<float>({1.f, 2.f, 3.f, 4.f}, {2, 2});
    x.set_requires_grad(true);
    mean(x * x).backward();  // d/dx mean(x^2) = 2x / 4
    REQUIRE(x.grad().dtype() == DType::f32);
    test::require_close(x.grad(), from_vector<float>({0.5f, 1.f, 1.5f, 2.f}, {2, 2}), 1e-6, 1e-6);
  }
}

TEST_CASE("autograd: shared subgraphs accumulate", "[autograd]") {
  SECTION("x used twice") {
    Tensor x = leaf({0.5, -2.0, 3.0}, {3});
    sum(x * x + x).backward();  // 2x + 1
    require_grad_values(x, {2.0, -3.0, 7.0});
  }
  SECTION("diamond: a = exp(x), y = sum((2a) * (3a))") {
    Tensor x = leaf({0.1, -0.7}, {2});
    Tensor a = exp(x);
    sum((a * 2.0) * (a * 3.0)).backward();  // y = 6 a^2, dy/dx = 12 a^2
    require_grad_values(x, {12 * std::exp(0.2), 12 * std::exp(-1.4)});
  }
  SECTION("several outputs in one backward call") {
    Tensor x = leaf({1.0, 2.0}, {2});
    autograd::backward({sum(x * 3.0), sum(x * x)});  // 3 + 2x
    require_grad_values(x, {5.0, 7.0});
  }
  SECTION("gradient with respect to an intermediate tensor") {
    Tensor x = leaf({1.0, -2.0}, {2});
    Tensor h = x * 2.0;
    std::vector<Tensor> g = autograd::grad({sum(h * h)}, {h, x});  // 2h and 8x
    test::require_close(g[0], f64({4.0, -8.0}, {2}), 1e-12, 1e-12);
    test::require_close(g[1], f64({8.0, -16.0}, {2}), 1e-12, 1e-12);
  }
}

TEST_CASE("autograd: a matmul's vjp adds the gradient gathered so far in its GEMM", "[autograd]") {
  // h = tanh(x) feeds three GEMMs (as a norm's output feeds q, k and v): h's gradient is the sum of three
  // products, the second and third computed with the sum so far as their GEMM's addend, so backward runs
  // no add.
  Tensor x = random_leaf({2, 5, 8}, 60);
  const Tensor w1 = test::random_tensor({8, 6}, DType::f64, 61), w2 = test::random_tensor({8, 3}, DType::f64, 62);
  const Tensor w3 = test::random_tensor({8, 4}, DType::f64, 63), c = test::random_tensor({2, 5, 4}, DType::f64, 64);
  auto f = [&](const std::vector<Tensor>& in) {
    const Tensor h = tanh(in[0]);
    return sum(matmul(h, w1)) + sum(exp(matmul(h, w2))) + sum(matmul(h, w3) * c);
  };
  test::KernelCounter count;
  {
    const Tensor y = f({x});
    HandlerScope scope(&count);
    y.backward();
  }
  CHECK(count.count("add") == 0);
  CHECK(count.count("matmul") == 3);
  const Tensor h = tanh(x.detach());
  const Tensor dh = matmul(ones({2, 5, 6}, DType::f64), w1.t()) + matmul(exp(matmul(h, w2)), w2.t()) + matmul(c, w3.t());
  test::require_close(x.grad(), dh * (1.0 - h * h), 1e-12, 1e-12);
  test::check_gradients(f, {x});
  // grad() catching h's gradient gets the whole sum
  Tensor hh = tanh(x);
  const std::vector<Tensor> gh = autograd::grad({sum(matmul(hh, w1)) + sum(matmul(hh, w3) * c)}, {hh});
  test::require_close(gh[0], matmul(ones({2, 5, 6}, DType::f64), w1.t()) + matmul(c, w3.t()), 1e-12, 1e-12);
}

TEST_CASE("autograd: .grad accumulates across backward calls until zero_grad", "[autograd]") {
  Tensor x = leaf({1.0, -1.0, 4.0}, {3});
  sum(x * 2.0).backward();
  sum(x * x).backward();
  require_grad_values(x, {4.0, 0.0, 10.0});  // 2 + 2x
  x.zero_grad();
  REQUIRE_FALSE(x.grad().defined());
  sum(x * 2.0).backward();
  require_grad_values(x, {2.0, 2.0, 2.0});
}

TEST_CASE("autograd: no_grad, enable_grad and detach", "[autograd]") {
  Tensor x = random_leaf({2, 3}, 3);
  SECTION("no_grad records nothing") {
    autograd::NoGradGuard no_grad;
    REQUIRE_FALSE(autograd::grad_enabled());
    Tensor y = exp(x * 2.0);
    REQUIRE_FALSE(y.requires_grad());
    REQUIRE(y.grad_fn() == nullptr);
    REQUIRE(y.is_leaf());
  }
  REQUIRE(autograd::grad_enabled());
  SECTION("enable_grad inside no_grad records again") {
    autograd::NoGradGuard no_grad;
    Tensor y;
    {
      autograd::EnableGradGuard grad_on;
      y = sum(x * x);
    }
    REQUIRE_FALSE(autograd::grad_enabled());
    REQUIRE(y.requires_grad());
    REQUIRE(y.grad_fn() != nullptr);
    y.backward();  // backward itself works under no_grad
    test::require_close(x.grad(), x * 2.0, 1e-12, 1e-12);
  }
  SECTION("detach cuts history") {
    Tensor d = (x * 3.0).detach();
    REQUIRE_FALSE(d.requires_grad());
    REQUIRE(d.grad_fn() == nullptr);
    sum(d * x).backward();  // only the direct path: d/dx (3x_const * x) = 3x
    test::require_close(x.grad(), x * 3.0, 1e-12, 1e-12);
  }
  SECTION("integer outputs of ops on grad-requiring inputs carry no gradient") {
    Tensor i = argmax(x, 1);
    REQUIRE_FALSE(i.requires_grad());
  }
}

TEST_CASE("autograd: retain_graph", "[autograd]") {
  Tensor x = leaf({1.5, -0.5}, {2});
  SECTION("a second backward without it raises") {
    Tensor y = sum(x * x);
    y.backward();
    REQUIRE_THROWS_AS(y.backward(), Error);
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("retain_graph"));
  }
  SECTION("with it the second backward works and doubles the gradient") {
    Tensor y = sum(x * x);
    y.backward(Tensor(), /*retain_graph=*/true);
    y.backward();
    require_grad_values(x, {6.0, -2.0});  // 2 * 2x
  }
}

TEST_CASE("autograd: in-place writes to saved tensors are detected", "[autograd]") {
  Tensor x = leaf({1.0, 2.0, 3.0}, {3});
  SECTION("fill_ of a saved operand") {
    Tensor w = f64({0.5, 0.5, 0.5}, {3});
    Tensor y = sum(x * w);
    {
      autograd::NoGradGuard no_grad;
      w.fill_(2.0);
    }
    // one attempt only: a failed backward has already released the nodes it went through
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("[backward]") && ContainsSubstring("modified in place"));
  }
  SECTION("copy_ into a saved output") {
    Tensor e = exp(x);  // exp saves its output
    Tensor y = sum(e);
    {
      autograd::NoGradGuard no_grad;
      e.copy_(ones_like(e));
    }
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("modified in place"));
  }
  SECTION("writing the base of a saved view") {
    Tensor base = f64({1.0, 2.0, 3.0, 4.0, 5.0}, {5});
    Tensor y = sum(x * base.narrow(0, 1, 3));
    {
      autograd::NoGradGuard no_grad;
      base.fill_(0.0);
    }
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("modified in place"));
  }
  SECTION("an in-place write to a tensor that requires grad, with grad mode on, raises at once") {
    REQUIRE_THROWS_AS(x.fill_(1.0), Error);
    REQUIRE_THROWS_WITH(x.copy_(zeros_like(x)), ContainsSubstring("NoGradGuard"));
  }
}

TEST_CASE("autograd: backward argument errors", "[autograd]") {
  Tensor x = random_leaf({2, 3}, 4);
  SECTION("a non-scalar output needs an explicit gradient") {
    Tensor y = x * 2.0;
    REQUIRE_THROWS_AS(y.backward(), Error);
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("[backward]") && ContainsSubstring("one-element"));
    y.backward(ones_like(y));
    test::require_close(x.grad(), full_like(x, 2.0), 1e-12, 1e-12);
  }
  SECTION("an output that does not require grad") {
    Tensor y = sum(test::random_tensor({3}, DType::f64, 5));
    REQUIRE_THROWS_WITH(y.backward(), ContainsSubstring("[backward]") && ContainsSubstring("does not require grad"));
  }
  SECTION("a gradient of the wrong shape") {
    Tensor y = x * 2.0;
    REQUIRE_THROWS_WITH(y.backward(ones({3, 2}, DType::f64)), ContainsSubstring("[backward]"));
  }
}

TEST_CASE("autograd: grad() returns gradients without touching .grad", "[autograd]") {
  Tensor x = leaf({1.0, 2.0}, {2});
  Tensor unused = random_leaf({3}, 6);
  std::vector<Tensor> g = autograd::grad({sum(x * x * 3.0)}, {x, unused});
  REQUIRE(g.size() == 2);
  test::require_close(g[0], f64({6.0, 12.0}, {2}), 1e-12, 1e-12);
  test::require_equal(g[1], zeros({3}, DType::f64));
  REQUIRE_FALSE(x.grad().defined());
  REQUIRE_FALSE(unused.grad().defined());
  REQUIRE_THROWS_WITH(autograd::grad({sum(x * 2.0)}, {test::random_tensor({2}, DType::f64, 7)}),
                      ContainsSubstring("[grad]"));
}

TEST_CASE("autograd: create_graph gives differentiable gradients", "[autograd]") {
  Tensor x = leaf({0.5, -1.25, 2.0}, {3});
  Tensor y = sum(x * x * x);
  Tensor g = autograd::grad({y}, {x}, {}, false, /*create_graph=*/true)[0];  // 3x^2
  test::require_close(g, f64({0.75, 4.6875, 12.0}, {3}), 1e-12, 1e-12);
  REQUIRE(g.requires_grad());
  Tensor g2 = autograd::grad({sum(g)}, {x})[0];  // 6x
  test::require_close(g2, f64({3.0, -7.5, 12.0}, {3}), 1e-12, 1e-12);
  REQUIRE_FALSE(x.grad().defined());

  SECTION("through backward(create_graph) as well") {
    Tensor z = sum(x * x * x);
    z.backward(Tensor(), false, /*create_graph=*/true);
    REQUIRE(x.grad().requires_grad());
    Tensor h = autograd::grad({sum(x.grad())}, {x})[0];
    test::require_close(h, f64({3.0, -7.5, 12.0}, {3}), 1e-12, 1e-12);
    // x.grad's graph holds x: a reference cycle (as in PyTorch) that only clearing the gradient breaks
    // (LeakSanitizer reports it otherwise).
    x.zero_grad();
  }
}

namespace {

// y0 = a * b, y1 = a + b, written by hand; records what it was asked for.
struct MulAdd : autograd::Function {
  bool forward_saw_grad_mode = true;
  std::vector<bool> asked;
  int backward_calls = 0;
  const char* name() const override { return "mul_add"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override {
    forward_saw_grad_mode = autograd::grad_enabled();
    save_for_backward({in[0], in[1]});
    return {in[0] * in[1], in[0] + in[1]};
  }
  std::vector<Tensor> backward(const std::vector<Tensor>& g) override {
    ++backward_calls;
    asked = needs_input_grad();
    const Tensor& a = saved()[0];
    const Tensor& b = saved()[1];
    Tensor ga = needs_input_grad()[0] ? g[0] * b + g[1] : Tensor();
    Tensor gb = needs_input_grad()[1] ? g[0] * a + g[1] : Tensor();
    return {ga, gb};
  }
};

// Returns its input unchanged.
struct Identity : autograd::Function {
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override { return {in[0]}; }
  std::vector<Tensor> backward(const std::vector<Tensor>& g) override { return {g[0]}; }
};

// Identity whose backward calls `on_backward` first.
struct Probe : autograd::Function {
  std::function<void()> on_backward;
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override { return {in[0]}; }
  std::vector<Tensor> backward(const std::vector<Tensor>& g) override {
    on_backward();
    return {g[0]};
  }
};

}  // namespace

TEST_CASE("autograd: custom Function", "[autograd]") {
  Tensor a = leaf({1.0, 2.0, -3.0}, {3});
  SECTION("forward without grad mode, backward with saved tensors and needs_input_grad") {
    Tensor b = f64({0.5, -1.0, 4.0}, {3});  // no gradient wanted
    auto fn = std::make_shared<MulAdd>();
    std::vector<Tensor> y = autograd::apply(fn, {a, b});
    REQUIRE(y.size() == 2);
    REQUIRE_FALSE(fn->forward_saw_grad_mode);
    REQUIRE(y[0].requires_grad());
    REQUIRE(y[0].grad_fn() != nullptr);
    test::require_close(y[0], a * b, 1e-15, 0.0);
    sum(y[0] * 2.0 + y[1]).backward();  // d/da = 2b + 1
    REQUIRE(fn->asked == std::vector<bool>{true, false});
    require_grad_values(a, {2.0, -1.0, 9.0});
    REQUIRE_THROWS_WITH(fn->saved(), ContainsSubstring("retain_graph"));
  }
  SECTION("an unused output gets a zero cotangent") {
    Tensor b = leaf({2.0, 2.0, 2.0}, {3});
    std::vector<Tensor> y = autograd::apply(std::make_shared<MulAdd>(), {a, b});
    sum(y[0]).backward();
    require_grad_values(a, {2.0, 2.0, 2.0});
    require_grad_values(b, {1.0, 2.0, -3.0});
  }
  SECTION("a second backward after the saved tensors were released raises") {
    auto fn = std::make_shared<MulAdd>();
    Tensor y = autograd::apply(fn, {a, a})[0];  // a^2
    y.backward(ones_like(y));
    require_grad_values(a, {2.0, 4.0, -6.0});
    REQUIRE_THROWS_WITH(y.backward(ones_like(y)), ContainsSubstring("retain_graph"));
    REQUIRE(fn->backward_calls == 1);
  }
  SECTION("with retain_graph it runs twice") {
    auto fn = std::make_shared<MulAdd>();
    Tensor y = sum(autograd::apply(fn, {a, a})[0]);
    y.backward(Tensor(), true);
    y.backward();
    REQUIRE(fn->backward_calls == 2);
    require_grad_values(a, {4.0, 8.0, -12.0});
  }
  SECTION("a forward that returns its input still gets its own history") {
    Tensor y = autograd::apply(std::make_shared<Identity>(), {a})[0];
    REQUIRE(y.grad_fn() != nullptr);
    REQUIRE(a.is_leaf());
    sum(y * y).backward();
    require_grad_values(a, {2.0, 4.0, -6.0});
  }
  SECTION("no node is recorded under no_grad") {
    autograd::NoGradGuard no_grad;
    Tensor y = autograd::apply(std::make_shared<Identity>(), {a})[0];
    REQUIRE_FALSE(y.requires_grad());
  }
}

TEST_CASE("autograd: checkpoint recomputes and matches the plain function", "[autograd]") {
  Tensor w1 = random_leaf({4, 5}, 10), w2 = random_leaf({5, 3}, 11);  // parameters captured by the closure
  Tensor x = random_leaf({2, 4}, 12);
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{matmul(tanh(matmul(in[0], w1)), w2)};  // (2, 3)
  };
  const std::string mm = op_name([] { matmul(ones({2, 2}), ones({2, 2})); });
  const std::string th = op_name([] { tanh(ones({2})); });

  Tensor out = block({x})[0];
  Tensor loss = sum(out * out);
  int plain_mm = 0, plain_th = 0;
  {
    test::OpCounter c;
    loss.backward();
    plain_mm = c.count(mm);
    plain_th = c.count(th);
  }
  Tensor gx = x.grad(), g1 = w1.grad(), g2 = w2.grad();
  x.zero_grad(); w1.zero_grad(); w2.zero_grad();

  Tensor ck_loss;
  {
    test::OpCounter c;
    Tensor ck_out = autograd::checkpoint(block, {x})[0];
    REQUIRE(ck_out.requires_grad());
    REQUIRE(c.count(mm) == 2);
    ck_loss = sum(ck_out * ck_out);
  }
  test::require_equal(ck_loss, loss);
  {
    test::OpCounter c;
    ck_loss.backward();
    REQUIRE(c.count(mm) == plain_mm + 2);  // the forward's two matmuls run again
    REQUIRE(c.count(th) == plain_th + 1);
  }
  test::require_close(x.grad(), gx, 1e-12, 1e-14);
  test::require_close(w1.grad(), g1, 1e-12, 1e-14);
  test::require_close(w2.grad(), g2, 1e-12, 1e-14);
}

TEST_CASE("autograd: checkpoint frees the recomputed outputs before the backward through them", "[autograd]") {
  // Their backward needs their nodes, not their data: a decoder layer's output is not held while its
  // backward runs.
  Tensor x = random_leaf({16, 32}, 13);
  std::weak_ptr<StorageImpl> recomputed;  // the output's storage, from the latest run of the block
  int probes = 0;
  bool released = false;
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    auto probe = std::make_shared<Probe>();
    probe->on_backward = [&] {
      ++probes;
      released = recomputed.expired();
    };
    Tensor out = mul(autograd::apply(probe, {tanh(in[0])})[0], 3.0);  // (16, 32); its node saves nothing
    recomputed = out.impl()->storage;
    return std::vector<Tensor>{out};
  };
  sum(autograd::checkpoint(block, {x})[0]).backward();
  CHECK(probes == 1);
  CHECK(released);
  const Tensor t = tanh(x.detach());
  test::require_close(x.grad(), (1.0 - t * t) * 3.0, 1e-12, 1e-12);
}

TEST_CASE("autograd: checkpoint replays dropout with the same mask", "[autograd]") {
  Tensor w1 = random_leaf({6, 8}, 20), w2 = random_leaf({8, 2}, 21);
  Tensor x = random_leaf({5, 6}, 22);
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{matmul(dropout(tanh(matmul(in[0], w1)), 0.5), w2)};  // (5, 2)
  };
  auto run = [&](bool use_checkpoint, uint64_t seed) {
    x.zero_grad(); w1.zero_grad(); w2.zero_grad();
    manual_seed(seed);
    Tensor out = use_checkpoint ? autograd::checkpoint(block, {x})[0] : block({x})[0];
    Tensor loss = sum(out * out);
    randn({7});  // other random work between forward and backward moves the default generator
    loss.backward();
    return std::vector<Tensor>{loss, x.grad(), w1.grad(), w2.grad()};
  };
  std::vector<Tensor> plain = run(false, 1234), ck = run(true, 1234);
  for (size_t i = 0; i < plain.size(); ++i) {
    INFO("result " << i << " (loss, dx, dw1, dw2)");
    test::require_close(ck[i], plain[i], 1e-12, 1e-14);
  }
  // the mask matters: another seed gives another loss
  REQUIRE_FALSE(test::all_close(run(false, 99)[0], plain[0], 1e-9, 0.0));
}

TEST_CASE("autograd: checkpoint_chunks runs a per-position function piece by piece", "[autograd]") {
  Tensor w1 = random_leaf({6, 8}, 23), w2 = random_leaf({8, 6}, 24);
  Tensor x = random_leaf({2, 13, 6}, 25);
  double p = 0.0;  // dropout probability
  auto fn = [&](const Tensor& v) { return v + matmul(dropout(tanh(matmul(v, w1)), p), w2); };  // (B, T', 6)
  auto run = [&](bool chunked, bool pieces_by_hand) {
    x.zero_grad(); w1.zero_grad(); w2.zero_grad();
    manual_seed(77);
    Tensor out;
    if (chunked) {
      out = autograd::checkpoint_chunks(fn, x, 1, 4);  // pieces of 4, 4, 4 and 1 positions
    } else if (pieces_by_hand) {  // the pieces in order, plain autograd: dropout draws as the chunks do
      std::vector<Tensor> pieces;
      for (int64_t s = 0; s < 13; s += 4) pieces.push_back(fn(narrow(x, 1, s, std::min<int64_t>(4, 13 - s))));
      out = cat(pieces, 1);
    } else {
      out = fn(x);
    }
    Tensor loss = sum(out * out);
    randn({3});  // other random work between forward and backward
    loss.backward();
    return std::vector<Tensor>{loss, x.grad(), w1.grad(), w2.grad()};
  };
  auto require_same = [](const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
    for (size_t i = 0; i < a.size(); ++i) {
      INFO("result " << i << " (loss, dx, dw1, dw2)");
      test::require_close(a[i], b[i], 1e-12, 1e-14);
    }
  };
  require_same(run(true, false), run(false, false));  // no dropout: fn on the whole
  p = 0.4;
  require_same(run(true, false), run(false, true));  // dropout: the same masks in the recompute
  REQUIRE_FALSE(test::all_close(run(true, false)[0], run(false, false)[0], 1e-9, 0.0));  // the masks matter
  // Forward keeps nothing but its output; backward makes no full-size gradient per piece.
  p = 0.0;
  size_t before = memory_usage(kCPU).allocated;
  const size_t one_output = [&] {  // what the allocator takes for an output (rounded up)
    const Tensor t = empty({2, 13, 6}, DType::f64);
    return memory_usage(kCPU).allocated - before;
  }();
  before = memory_usage(kCPU).allocated;
  Tensor out = autograd::checkpoint_chunks(fn, x, -2, 4);
  CHECK(memory_usage(kCPU).allocated - before == one_output);
  test::OpCounter count;
  test::KernelCounter kernels;
  {
    HandlerScope scope(&kernels);
    sum(out).backward();
  }
  CHECK(count.count("slice_backward") == 0);
  // Per piece: 1 GEMM recomputed (v @ w1; the one with w2 only feeds the piece's output, which nothing
  // reads: left out, in the last piece of 1 position too), 4 in backward (dx and dw of each).
  CHECK(kernels.count("matmul") == 4 * (1 + 4));
  // Bad input.
  CHECK_THROWS_WITH(autograd::checkpoint_chunks(fn, x, 1, 0), ContainsSubstring("chunk must be positive"));
  CHECK_THROWS_WITH(autograd::checkpoint_chunks([](const Tensor& v) { return sum(v, {1}); }, x, 1, 4),
                    ContainsSubstring("keep a piece's shape"));
}

TEST_CASE("autograd: requires_grad rules", "[autograd]") {
  Tensor i = from_vector<int64_t>({1, 2, 3}, {3});
  REQUIRE_THROWS_AS(i.set_requires_grad(true), Error);
  REQUIRE_THROWS_WITH(i.set_requires_grad(true), ContainsSubstring("[requires_grad]"));
  i.set_requires_grad(false);  // turning it off is always fine on a leaf

  Tensor x = random_leaf({3}, 30);
  Tensor y = x * 2.0;
  REQUIRE_FALSE(y.is_leaf());
  REQUIRE_THROWS_WITH(y.set_requires_grad(false), ContainsSubstring("leaf"));
  Tensor d = y.detach();
  d.set_requires_grad(true);
  REQUIRE(d.is_leaf());
}

TEST_CASE("autograd: tensors on different devices do not mix", "[autograd]") {
  // A tensor that claims to live on cuda:0 (its bytes are host memory): dispatch must reject the
  // mix before any kernel can touch it.
  auto host = std::make_shared<std::vector<float>>(6, 1.0f);  // (2, 3)
  Tensor on_gpu = from_blob(host->data(), {2, 3}, DType::f32, Device("cuda:0"), host);
  Tensor on_gpu_t = on_gpu.t();  // views need no kernel: (3, 2)
  Tensor on_cpu = ones({2, 3});
  const std::string add_name = op_name([&] { add(on_cpu, on_cpu); });
  const std::string mul_name = op_name([&] { mul(on_cpu, on_cpu); });
  const std::string mm_name = op_name([&] { matmul(on_cpu, on_cpu.t()); });
  test::OpCounter c;
  REQUIRE_THROWS_AS(add(on_cpu, on_gpu), Error);
  REQUIRE_THROWS_WITH(mul(on_gpu, on_cpu), ContainsSubstring("device"));
  REQUIRE_THROWS_WITH(matmul(on_cpu, on_gpu_t), ContainsSubstring("device"));
  REQUIRE(c.count(add_name) + c.count(mul_name) + c.count(mm_name) == 0);

  Tensor x = random_leaf({2, 3}, 31);
  Tensor y = x * 2.0;
  REQUIRE_THROWS_WITH(y.backward(on_gpu), ContainsSubstring("[backward]") && ContainsSubstring("cuda:0"));
}

TEST_CASE("autograd: long chains backward and free without recursion", "[autograd]") {
  Tensor x = leaf({0.5}, {1});
  {
    Tensor h = x;
    for (int i = 0; i < 20000; ++i) h = h * 1.0001;
    sum(h).backward();
  }
  test::require_close(x.grad(), f64({std::pow(1.0001, 20000)}, {1}), 1e-9, 0.0);
  {
    // a graph far deeper than the stack could free recursively, dropped without a backward
    Tensor h = x;
    for (int i = 0; i < 400000; ++i) h = h + 1.0;
    REQUIRE(h.requires_grad());
  }
}

TEST_CASE("autograd: checkpoint trains captured parameters when no input requires grad", "[autograd]") {
  Tensor w = random_leaf({3, 2}, 40);
  Tensor x = test::random_tensor({4, 3}, DType::f64, 41);  // a frozen input, like token embeddings
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{tanh(matmul(in[0], w))}; };
  sum(block({x})[0]).backward();
  Tensor plain = w.grad();
  w.zero_grad();
  Tensor out = autograd::checkpoint(block, {x})[0];
  REQUIRE(out.requires_grad());
  sum(out).backward();
  test::require_close(w.grad(), plain, 1e-12, 1e-14);
}

TEST_CASE("autograd: selective checkpoint reuses the saved ops' outputs in the recompute", "[autograd]") {
  Tensor w = random_leaf({4, 3}, 50);
  Tensor x = random_leaf({2, 4}, 51);
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{exp(matmul(in[0], w))}; };
  const Tensor w_old = w.detach().clone(), w_new = test::random_tensor({4, 3}, DType::f64, 52);
  // w changes between forward and backward: a recompute would see the new w in exp(x @ w); the
  // saved matmul output keeps the old one (the vjp of the matmul reads the w it finds).
  for (bool saving : {false, true}) {
    INFO("saving matmul outputs: " << saving);
    { autograd::NoGradGuard g; w.copy_(w_old); }
    x.zero_grad();
    autograd::CheckpointOptions co;
    if (saving) co.save = [](const Primitive& op) { return std::string(op.name()) == "matmul"; };
    Tensor out = autograd::checkpoint(block, {x}, co)[0];
    { autograd::NoGradGuard g; w.copy_(w_new); }
    sum(out).backward();
    const Tensor e = exp(matmul(x.detach(), saving ? w_old : w_new));  // (2, 3)
    test::require_close(x.grad(), matmul(e, w_new.transpose(0, 1)), 1e-12, 1e-14);
  }
  // A second backward through a selective checkpoint (retain_graph) runs the saved op again.
  { autograd::NoGradGuard g; w.copy_(w_old); }
  x.zero_grad();
  autograd::CheckpointOptions co;
  co.save = [](const Primitive& op) { return std::string(op.name()) == "matmul"; };
  Tensor out = autograd::checkpoint(block, {x}, co)[0];
  sum(out).backward({}, /*retain_graph=*/true);
  const Tensor once = x.grad().clone();
  sum(out).backward();
  test::require_close(x.grad(), once * 2.0, 1e-12, 1e-14);
}

TEST_CASE("autograd: a checkpoint's recompute leaves out the ops whose outputs nothing reads", "[autograd]") {
  // The end of a LoRA linear: base = h @ w2, out = (h @ a) @ b + base. The last GEMM's output only
  // carries the gradient back, and its vjp reads neither its output nor its addend (base), so neither
  // GEMM runs again; h (tanh reads its output in backward) and h @ a (the last GEMM's vjp reads it) do.
  Tensor w1 = random_leaf({4, 5}, 60), w2 = random_leaf({5, 3}, 61), a = random_leaf({5, 2}, 62), b = random_leaf({2, 3}, 63);
  Tensor x = random_leaf({6, 4}, 64);
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    const Tensor h = tanh(matmul(in[0], w1));  // (6, 5)
    return std::vector<Tensor>{matmul_add(matmul(h, a), b, matmul(h, w2), 0.5)};  // (6, 3)
  };
  const std::string mm = op_name([] { matmul(ones({2, 2}), ones({2, 2})); });
  const std::string mma = op_name([] { matmul_add(ones({2, 2}), ones({2, 2}), ones({2, 2})); });
  const Tensor seed = test::random_tensor({6, 3}, DType::f64, 65);
  auto run = [&](bool checkpointed) {
    for (Tensor* t : {&x, &w1, &w2, &a, &b}) t->zero_grad();
    Tensor out = checkpointed ? autograd::checkpoint(block, {x})[0] : block({x})[0];
    test::KernelCounter counter;
    {
      HandlerScope scope(&counter);
      sum(out * seed).backward();
    }
    return counter;
  };
  const test::KernelCounter plain = run(false);
  const std::vector<Tensor> expected = {x.grad().clone(), w1.grad().clone(), w2.grad().clone(), a.grad().clone(),
                                        b.grad().clone()};
  const test::KernelCounter ck = run(true);
  const std::vector<Tensor> got = {x.grad(), w1.grad(), w2.grad(), a.grad(), b.grad()};
  for (size_t i = 0; i < got.size(); ++i) test::require_close(got[i], expected[i], 1e-12, 1e-14);
  auto n = [](const test::KernelCounter& k, const std::string& name) { return k.count(name); };
  const int recompute_mm = n(ck, mm) - n(plain, mm) + (mm == mma ? 0 : n(ck, mma) - n(plain, mma));
  INFO("matmul kernels: plain backward " << n(plain, mm) << ", checkpointed " << n(ck, mm));
  REQUIRE(recompute_mm == 2);            // x @ w1 and h @ a; not h @ w2 nor the last GEMM
  REQUIRE(ck.kernels - plain.kernels == 3);  // and tanh
}

// y = 3x as a custom Function whose backward reads no value: a recompute may leave it out.
struct TimesThree : autograd::Function {
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override { return {in[0] * 3.0}; }
  std::vector<Tensor> backward(const std::vector<Tensor>& g) override { return {g[0] * 3.0}; }
  bool backward_reads_input(size_t) const override { return false; }
  bool backward_reads_outputs() const override { return false; }
};

TEST_CASE("autograd: a recompute that departs from the first forward computes what it left out", "[autograd]") {
  // With grad on (the recompute), the block reads outputs the first forward's record says nothing
  // reads: the left-out GEMMs (and a left-out custom Function) run then, and the gradient is that of
  // the block run with grad.
  Tensor w1 = random_leaf({4, 5}, 70), w2 = random_leaf({5, 3}, 71), a = random_leaf({5, 2}, 72), b = random_leaf({2, 3}, 73);
  Tensor x = random_leaf({6, 4}, 74);
  for (bool function : {false, true}) {
    INFO("the tail is " << (function ? "a custom Function" : "two GEMMs"));
    autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
      const Tensor h = tanh(matmul(in[0], w1));
      const Tensor base = matmul(h, w2);
      Tensor out = function ? autograd::apply(std::make_shared<TimesThree>(), {base})[0] : matmul_add(matmul(h, a), b, base, 0.5);
      if (autograd::grad_enabled()) out = out * exp(base);  // reads base's and out's values
      return std::vector<Tensor>{out};
    };
    const Tensor seed = test::random_tensor({6, 3}, DType::f64, 75);
    for (Tensor* t : {&x, &w1, &w2, &a, &b}) t->zero_grad();
    sum(block({x})[0] * seed).backward();
    const Tensor gx = x.grad().clone(), gw2 = w2.grad().clone();
    for (Tensor* t : {&x, &w1, &w2, &a, &b}) t->zero_grad();
    sum(autograd::checkpoint(block, {x})[0] * seed).backward();
    test::require_close(x.grad(), gx, 1e-12, 1e-14);
    test::require_close(w2.grad(), gw2, 1e-12, 1e-14);
  }
}

TEST_CASE("autograd: a checkpoint keeps a custom Function's marked output: the recompute runs neither it nor its input's GEMM",
          "[autograd]") {
  // y = 3 (h @ w2) by a custom Function, marked with keep_for_recompute; exp reads y's value. Kept, the
  // recompute takes y from the first forward: the Function's ops and h @ w2 (read by nothing else) stay
  // out, h (read by h @ w2's backward) and exp do not; the gradients are the plain block's.
  Tensor w1 = random_leaf({4, 5}, 80), w2 = random_leaf({5, 3}, 81);
  Tensor x = random_leaf({6, 4}, 82);
  autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    const Tensor h = tanh(matmul(in[0], w1));                                    // (6, 5)
    const Tensor y = autograd::apply(std::make_shared<TimesThree>(), {matmul(h, w2)})[0];  // (6, 3)
    autograd::keep_for_recompute(y);
    return std::vector<Tensor>{exp(y)};
  };
  const Tensor seed = test::random_tensor({6, 3}, DType::f64, 83);
  auto run = [&](int mode) {  // 0: plain, 1: checkpointed, 2: checkpointed keeping y
    for (Tensor* t : {&x, &w1, &w2}) t->zero_grad();
    autograd::CheckpointOptions co;
    co.keep_marked = mode == 2;
    Tensor out = mode == 0 ? block({x})[0] : autograd::checkpoint(block, {x}, co)[0];
    test::KernelCounter counter;
    {
      HandlerScope scope(&counter);
      sum(out * seed).backward();
    }
    return std::make_pair(counter, std::vector<Tensor>{x.grad().clone(), w1.grad().clone(), w2.grad().clone()});
  };
  const auto [plain, expected] = run(0);
  const auto [ck, ck_grads] = run(1);
  const auto [kept, kept_grads] = run(2);
  for (size_t i = 0; i < expected.size(); ++i) {
    test::require_close(ck_grads[i], expected[i], 1e-12, 1e-14);
    test::require_close(kept_grads[i], expected[i], 1e-12, 1e-14);
  }
  const std::string mm = op_name([] { matmul(ones({2, 2}), ones({2, 2})); });
  INFO("kernels: plain backward " << plain.kernels << ", checkpointed " << ck.kernels << ", keeping y " << kept.kernels);
  REQUIRE(ck.count(mm) - plain.count(mm) == 2);    // x @ w1 and h @ w2 again
  REQUIRE(kept.count(mm) - plain.count(mm) == 1);  // x @ w1 only
  test::KernelCounter function_ops;  // the Function's forward alone (its scalar and its multiply)
  {
    const Tensor probe = ones({6, 3}, DType::f64);
    HandlerScope scope(&function_ops);
    (void)TimesThree().forward({probe});
  }
  REQUIRE(function_ops.kernels >= 1);
  REQUIRE(ck.kernels - kept.kernels == 1 + function_ops.kernels);  // h @ w2 and the Function's ops
}

TEST_CASE("test helpers: random inputs, strided views, comparisons", "[helpers]") {
  SECTION("random_tensor is reproducible per seed and draws every dtype") {
    test::require_equal(test::random_tensor({4, 5}, DType::f32, 1), test::random_tensor({4, 5}, DType::f32, 1));
    REQUIRE_FALSE(test::all_close(test::random_tensor({4, 5}, DType::f32, 1), test::random_tensor({4, 5}, DType::f32, 2)));
    for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean}) {
      Tensor t = test::random_tensor({3, 7}, d, 3, /*noncontiguous=*/true);
      INFO(dtype_name(d));
      REQUIRE(t.dtype() == d);
      REQUIRE(t.shape() == Shape{3, 7});
      REQUIRE_FALSE(t.is_contiguous());
      std::vector<double> v = values(t);
      double lo = v[0], hi = v[0];
      for (double e : v) { lo = std::min(lo, e); hi = std::max(hi, e); }
      REQUIRE(lo < hi);  // not constant
      if (!is_floating(d)) REQUIRE((lo >= -5 && hi < 10));
    }
  }
  SECTION("make_noncontiguous keeps shape and values") {
    for (const Shape& s : std::vector<Shape>{{}, {1}, {5}, {3, 1}, {1, 4}, {2, 3, 4}}) {
      Tensor t = test::random_tensor(s, DType::f64, 4);
      Tensor n = test::make_noncontiguous(t);
      REQUIRE(n.shape() == s);
      if (t.numel() > 1) REQUIRE_FALSE(n.is_contiguous());
      test::require_equal(n, t);
    }
  }
  SECTION("random_away_from_zero") {
    std::vector<double> v = values(test::random_away_from_zero({50}, DType::f64, 5));
    bool neg = false;
    for (double e : v) { REQUIRE((std::abs(e) >= 0.5 && std::abs(e) < 2.0)); neg = neg || e < 0; }
    REQUIRE(neg);
    for (double e : values(test::random_away_from_zero({50}, DType::f32, 5, true))) REQUIRE(e > 0);
  }
  SECTION("all_close: tolerances, NaN and shapes") {
    Tensor a = f64({1.0, NAN, 3.0}, {3});
    REQUIRE(test::all_close(a, f64({1.0 + 1e-9, NAN, 3.0}, {3})));
    REQUIRE_FALSE(test::all_close(a, f64({1.0, 2.0, 3.0}, {3})));
    REQUIRE_FALSE(test::all_close(a, f64({1.1, NAN, 3.0}, {3})));
    REQUIRE_FALSE(test::all_close(a, f64({1.0, NAN, 3.0}, {3, 1})));
  }
  SECTION("check_gradients passes on a composite function") {
    Tensor w = random_leaf({3, 2}, 6);
    Tensor x = test::make_noncontiguous(test::random_tensor({4, 3}, DType::f64, 7));
    x.set_requires_grad(true);
    test::check_gradients([](const std::vector<Tensor>& in) { return tanh(matmul(in[0], in[1])) * exp(in[1].sum({0})); },
                          {x, w});
  }
}

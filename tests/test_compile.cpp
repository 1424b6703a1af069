// compile/: tracing (forward and backward, no kernels), CSE/DCE, symbolic sizes and guards, fusion
// group counts, the CPU executor against eager (forward and backward) for each fusable pattern, f64
// finite differences through a compiled region, codegen and the disk cache, fallbacks and stats
// (Llama models compiled: test_compile_llama.cpp).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "autograd/checkpoint.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "compile/codegen.h"
#include "compile/compile.h"
#include "compile/disk_cache.h"
#include "compile/fusion.h"
#include "compile/passes.h"
#include "compile/plan.h"
#include "compile/recompute.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "core/ops/elementwise.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

int count_ops(const compile::Graph& g, const std::string& name) {
  return static_cast<int>(std::count_if(g.nodes.begin(), g.nodes.end(),
                                        [&](const compile::Node& n) { return name == n.op->name(); }));
}

// Runs f eagerly and compiled on fresh leaves; compares outputs and the gradients of sum(out * r).
void require_matches_eager(const compile::Fn& f, const std::vector<Tensor>& inputs, double rtol = 1e-5,
                           double atol = 1e-6) {
  auto leaves = [&] {
    std::vector<Tensor> l;
    for (const Tensor& t : inputs) {
      Tensor c = t.detach();
      if (t.requires_grad()) c.set_requires_grad(true);
      l.push_back(c);
    }
    return l;
  };
  const std::vector<Tensor> le = leaves(), lc = leaves();
  const std::vector<Tensor> eager = f(le);
  const std::vector<Tensor> compiled = compile::compile(f)(lc);
  REQUIRE(eager.size() == compiled.size());
  std::vector<Tensor> ge, gc, wrt_e, wrt_c, ro, roc;
  for (size_t i = 0; i < eager.size(); ++i) {
    INFO("output " << i);
    REQUIRE(compiled[i].shape() == eager[i].shape());
    REQUIRE(compiled[i].dtype() == eager[i].dtype());
    test::require_close(compiled[i], eager[i], rtol, atol);
    if (eager[i].requires_grad()) {
      REQUIRE(compiled[i].requires_grad());
      ro.push_back(eager[i]);
      roc.push_back(compiled[i]);
      ge.push_back(test::random_tensor(eager[i].shape(), eager[i].dtype(), 100 + i));
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].requires_grad()) wrt_e.push_back(le[i]), wrt_c.push_back(lc[i]);
  if (ro.empty() || wrt_e.empty()) return;
  const std::vector<Tensor> de = autograd::grad(ro, wrt_e, ge);
  const std::vector<Tensor> dc = autograd::grad(roc, wrt_c, ge);
  for (size_t i = 0; i < de.size(); ++i) {
    INFO("gradient " << i);
    test::require_close(dc[i], de[i], rtol, atol);
  }
}

}  // namespace

TEST_CASE("compile: trace records forward and backward graphs without running a kernel", "[compile]") {
  Tensor x = test::random_tensor({4, 8}, DType::f32, 1).set_requires_grad(true);
  Tensor w = test::random_tensor({8}, DType::f32, 2).set_requires_grad(true);  // captured
  auto f = [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{exp(in[0] * w) + 1.0}; };
  test::KernelCounter counter;
  std::shared_ptr<compile::TraceState> t;
  {
    HandlerScope scope(&counter);
    t = compile::trace(f, {x});
  }
  REQUIRE(counter.kernels == 0);
  const compile::Graph& g = t->forward;
  REQUIRE(count_ops(g, "mul") == 1);
  REQUIRE(count_ops(g, "exp") == 1);
  REQUIRE(count_ops(g, "add") == 1);
  REQUIRE(count_ops(g, "fill") == 1);  // the scalar 1.0
  REQUIRE(t->externals.size() == 1);
  REQUIRE(t->externals[0].impl() == w.impl());  // captured by identity
  REQUIRE(t->needs_grad);
  REQUIRE(t->has_backward);
  // backward reads exp's output (saved) and w, and yields gradients for x and w
  REQUIRE(t->backward.outputs.size() == 2);
  bool saved = false;
  for (int v : t->backward.inputs) saved = saved || t->backward.values[static_cast<size_t>(v)].input.kind == compile::InputKind::saved;
  REQUIRE(saved);
  REQUIRE(count_ops(t->backward, "mul") >= 2);
  REQUIRE_FALSE(x.grad().defined());  // tracing the backward touched no .grad
  REQUIRE_FALSE(w.grad().defined());
}

TEST_CASE("compile: pointwise chain matches eager, forward and backward", "[compile]") {
  Tensor x = test::random_tensor({3, 5, 16}, DType::f32, 3).set_requires_grad(true);
  Tensor y = test::random_tensor({16}, DType::f32, 4).set_requires_grad(true);
  auto f = [](const std::vector<Tensor>& in) {
    Tensor a = tanh(in[0] * in[1] + 0.5);
    return std::vector<Tensor>{sigmoid(a) * in[0] - square(in[1])};
  };
  compile::reset_stats();
  require_matches_eager(f, {x, y});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 1);
}

TEST_CASE("compile: residual add + rms_norm is one row group", "[compile]") {
  Tensor x = test::random_tensor({2, 7, 32}, DType::f32, 5).set_requires_grad(true);
  Tensor r = test::random_tensor({2, 7, 32}, DType::f32, 6).set_requires_grad(true);
  Tensor w = test::random_tensor({32}, DType::f32, 7).set_requires_grad(true);
  auto f = [&](const std::vector<Tensor>& in) {
    Tensor h = in[0] + in[1];
    return std::vector<Tensor>{rms_norm(h, w, 1e-6), h};
  };
  compile::reset_stats();
  require_matches_eager(f, {x, r});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 1);  // eager: add, rms_norm
  // the composite form (mean of squares, rsqrt, scale) fuses the same way
  auto composite = [&](const std::vector<Tensor>& in) {
    Tensor h = in[0] + in[1];
    Tensor ms = mean(h * h, {-1}, true);
    return std::vector<Tensor>{h * rsqrt(ms + 1e-6) * w};
  };
  require_matches_eager(composite, {x, r});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 1);
}

TEST_CASE("compile: rope-like rotation of two halves fuses into one group beside the cat", "[compile]") {
  Tensor x = test::random_tensor({2, 3, 5, 8}, DType::f32, 8).set_requires_grad(true);
  Tensor c = test::random_tensor({5, 4}, DType::f32, 9);
  Tensor s = test::random_tensor({5, 4}, DType::f32, 10);
  auto f = [&](const std::vector<Tensor>& in) {
    Tensor x1 = narrow(in[0], -1, 0, 4), x2 = narrow(in[0], -1, 4, 4);
    return std::vector<Tensor>{cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1)};
  };
  compile::reset_stats();
  require_matches_eager(f, {x});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 2);  // the group and cat (eager: 6 + cat)
  // matches the fused rotary op
  autograd::NoGradGuard g;
  test::require_close(compile::compile(f)({x})[0], rotary_embedding(x, c, s), 1e-5, 1e-6);
}

TEST_CASE("compile: swiglu composite and the swiglu op are one group each way", "[compile]") {
  Tensor gt = test::random_tensor({4, 6, 24}, DType::f32, 11).set_requires_grad(true);
  Tensor up = test::random_tensor({4, 6, 24}, DType::f32, 12).set_requires_grad(true);
  compile::reset_stats();
  require_matches_eager([](const std::vector<Tensor>& in) { return std::vector<Tensor>{swiglu_composite(in[0], in[1])}; },
                        {gt, up});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 1);
  // swiglu's own kernel stays a single op, but its backward fuses with what follows it
  require_matches_eager([](const std::vector<Tensor>& in) { return std::vector<Tensor>{swiglu(in[0], in[1]) * 2.0}; },
                        {gt, up});
  REQUIRE(compile::stats().last_forward_groups == 1);
}

TEST_CASE("compile: a group computes what its fused ops share once (value numbering of instructions)", "[compile]") {
  // Two swiglus of one gate lower sigmoid(gate) each; the group's program computes it once.
  Tensor gt = test::random_tensor({3, 5, 16}, DType::bf16, 13);
  Tensor u1 = test::random_tensor({3, 5, 16}, DType::bf16, 14), u2 = test::random_tensor({3, 5, 16}, DType::bf16, 15);
  const compile::Fn f = [](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{swiglu(in[0], in[1]) * 2.0 + swiglu(in[0], in[2])};
  };
  auto t = [&] {
    autograd::NoGradGuard ng;
    return compile::trace(f, {gt, u1, u2}, false);
  }();
  compile::PlanInput in;
  in.graph = &t->forward;
  const compile::Plan plan = compile::build_plan(in);
  REQUIRE(plan.fusion.groups.size() == 1);
  const compile::Program& p = plan.fusion.groups[0].program;
  const auto count = [&](compile::Op op, UnaryOp u) {
    return std::count_if(p.instrs.begin(), p.instrs.end(),
                         [&](const compile::Instr& i) { return i.op == op && (op != compile::Op::unary || i.code == static_cast<int>(u)); });
  };
  CHECK(count(compile::Op::unary, UnaryOp::exp) == 1);
  CHECK(count(compile::Op::load, UnaryOp::exp) == 3);
  for (size_t i = 0; i < p.instrs.size(); ++i)
    for (size_t j = 0; j < i; ++j) {
      const compile::Instr &a = p.instrs[i], &b = p.instrs[j];
      CHECK_FALSE((a.op == b.op && a.a == b.a && a.b == b.b && a.c == b.c && a.code == b.code && a.dtype == b.dtype &&
                   a.level == b.level && a.value == b.value && a.op != compile::Op::load));
    }
  // and still rounds as eager does, forward and backward
  require_matches_eager(f, {gt.to(DType::f32).set_requires_grad(true), u1.to(DType::f32).set_requires_grad(true),
                            u2.to(DType::f32).set_requires_grad(true)});
  require_matches_eager(f, {gt, u1, u2}, 1e-2, 1e-2);
}

TEST_CASE("compile: LoRA scale-and-add fuses around the two small matmuls", "[compile]") {
  Tensor x = test::random_tensor({2, 5, 16}, DType::f32, 13).set_requires_grad(true);
  Tensor w = test::random_tensor({24, 16}, DType::f32, 14).set_requires_grad(true);
  Tensor a = test::random_tensor({4, 16}, DType::f32, 15).set_requires_grad(true);
  Tensor b = test::random_tensor({24, 4}, DType::f32, 16).set_requires_grad(true);
  auto f = [&](const std::vector<Tensor>& in) {
    Tensor y = matmul(in[0], w.t());                                  // (2, 5, 24)
    Tensor delta = matmul(matmul(in[0], a.t()), b.t());               // (2, 5, 24)
    return std::vector<Tensor>{gelu(y + delta * 0.5)};
  };
  compile::reset_stats();
  require_matches_eager(f, {x});
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 4);  // 3 matmuls + one group for mul, add, gelu
  REQUIRE(w.grad().defined() == false);                 // gradients went through autograd::grad only
}

TEST_CASE("compile: an add of GEMM outputs runs in the GEMM's epilogue, forward and backward", "[compile]") {
  // A LoRA sum written as two GEMMs and an add (kiln's LoraLinear passes the base output to the second
  // GEMM as its addend itself): base + (x A^T) B^T, with x read by two
  // such layers (q and k), so backward also accumulates x's gradient from four GEMMs.
  Tensor x = test::random_tensor({2, 5, 16}, DType::f32, 31).set_requires_grad(true);
  Tensor w1 = test::random_tensor({24, 16}, DType::f32, 32), w2 = test::random_tensor({8, 16}, DType::f32, 33);
  Tensor a1 = test::random_tensor({4, 16}, DType::f32, 34).set_requires_grad(true);
  Tensor b1 = test::random_tensor({24, 4}, DType::f32, 35).set_requires_grad(true);
  Tensor a2 = test::random_tensor({4, 16}, DType::f32, 36).set_requires_grad(true);
  Tensor b2 = test::random_tensor({8, 4}, DType::f32, 37).set_requires_grad(true);
  auto lora = [](const Tensor& in, const Tensor& w, const Tensor& a, const Tensor& b) {
    return add(matmul(in, w.t()), matmul(matmul(in, a.t()), b.t()));
  };
  auto f = [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{lora(in[0], w1, a1, b1), lora(in[0], w2, a2, b2)};
  };
  compile::reset_stats();
  require_matches_eager(f, {x});
  const compile::Stats s = compile::stats();
  REQUIRE(s.last_forward_kernels == 6);  // six GEMMs, two with the add in their epilogue
  REQUIRE(s.last_forward_groups == 0);
  // backward: x's gradient sums two base and two LoRA products: three adds, all folded
  REQUIRE(s.folded_adds >= 2 + 3);

  // An addend from pointwise work stays in that work's group (folding would split it): y + delta * 0.5
  auto g = [&](const std::vector<Tensor>& in) {
    Tensor y = matmul(in[0], w1.t());
    return std::vector<Tensor>{gelu(y + matmul(matmul(in[0], a1.t()), b1.t()) * 0.5)};
  };
  compile::reset_stats();
  require_matches_eager(g, {x});
  REQUIRE(compile::stats().last_forward_kernels == 4);
}

TEST_CASE("compile: a chunked head's focal loss compiled equals eager; every chunk size shares one plan", "[compile]") {
  const Tensor h = test::random_tensor({2, 19, 16}, DType::f32, 41);
  const Tensor w = test::random_tensor({37, 16}, DType::f32, 42);
  Generator gen(44);
  Tensor targets = randint(0, 37, {2, 19}, DType::i64, kCPU, &gen);
  targets = where(lt(test::random_tensor({2, 19}, DType::f32, 43), -1.2), full({2, 19}, -100.0, DType::i64), targets);
  nn::ChunkedLossOptions o;
  o.chunk_size = 8;  // chunks of 8, 8, 8, 8, 6 tokens
  const nn::LossFn compiled = compile::compile_loss(nn::focal_loss(2.0));
  auto run = [&](const nn::LossFn& fn) {
    Tensor hl = h.detach().set_requires_grad(true);
    Tensor loss = nn::chunked_linear_loss(hl, w, targets, fn, o);
    return std::make_pair(loss, autograd::grad({loss}, {hl})[0]);
  };
  compile::reset_stats();
  const auto [le, ge] = run(nn::focal_loss(2.0));
  const auto [lc, gc] = run(compiled);
  test::require_close(lc, le, 1e-6, 1e-7);
  test::require_close(gc, ge, 1e-5, 1e-7);
  const compile::Stats s = compile::stats();
  REQUIRE(s.calls == 5);
  REQUIRE(s.compilations <= 4);  // forward and backward, each at most once more when the last chunk's size goes symbolic
  REQUIRE(s.fallback_ops == 0);
  REQUIRE(s.eager_calls == 0);
  REQUIRE(s.last_forward_groups >= 1);  // (1 - p_t)^gamma * nll: one group beside the cross-entropy op
  REQUIRE_THROWS_WITH(compile::compile_loss(nullptr), ContainsSubstring("[compile]"));
}

TEST_CASE("compile: softmax-like rows: composite and the op fuse with their prologue", "[compile]") {
  Tensor x = test::random_tensor({3, 4, 33}, DType::f32, 17).set_requires_grad(true);
  Tensor m = test::random_tensor({33}, DType::f32, 18);
  auto composite = [&](const std::vector<Tensor>& in) {
    Tensor z = in[0] * 0.25 + m;
    Tensor e = exp(z - amax(z, {-1}, true));
    return std::vector<Tensor>{e / sum(e, {-1}, true)};
  };
  auto op = [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{softmax(in[0] * 0.25 + m, -1)}; };
  auto logs = [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{log_softmax(in[0] * 0.25 + m, -1), logsumexp(in[0], {-1}, false)};
  };
  compile::reset_stats();
  for (const compile::Fn& f : {compile::Fn(composite), compile::Fn(op), compile::Fn(logs)}) {
    require_matches_eager(f, {x});
    REQUIRE(compile::stats().last_forward_groups == 1);
    REQUIRE(compile::stats().last_forward_kernels == 1);
  }
  // rows of -inf: softmax gives zeros, log_softmax -inf, logsumexp -inf, as eager
  Tensor dead = full({2, 5}, -INFINITY);
  autograd::NoGradGuard g;
  auto rows = [](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{softmax(in[0] + 0.0, -1), log_softmax(in[0] * 1.0, -1), logsumexp(in[0] - 0.0, {-1})};
  };
  const std::vector<Tensor> want = rows({dead}), got = compile::compile(rows)({dead});
  for (size_t i = 0; i < want.size(); ++i) test::require_equal(got[i], want[i]);
}

TEST_CASE("compile: dropout draws the same Philox numbers as eager, forward and backward", "[compile]") {
  Tensor x = test::random_tensor({4, 9, 20}, DType::f32, 19).set_requires_grad(true);
  auto f = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{dropout(in[0] * 2.0 + 1.0, 0.3) * in[0]}; };
  manual_seed(1234);
  Tensor xe = x.detach().set_requires_grad(true);
  Tensor eager = f({xe})[0];
  Tensor ge = autograd::grad({eager}, {xe}, {ones_like(eager)})[0];
  const compile::CompiledFunction cf = compile::compile(f);
  manual_seed(1234);
  compile::reset_stats();
  Tensor xc = x.detach().set_requires_grad(true);
  Tensor got = cf({xc})[0];
  Tensor gc = autograd::grad({got}, {xc}, {ones_like(got)})[0];
  test::require_equal(got, eager);
  test::require_close(gc, ge);
  REQUIRE(compile::stats().last_forward_groups == 1);
  REQUIRE(compile::stats().last_forward_kernels == 1);
  REQUIRE(compile::stats().compilations == 2);  // forward and backward
  // the next call draws fresh numbers (the generator advanced), as eager does, without recompiling
  Tensor xa = x.detach().set_requires_grad(true);
  Tensor again = cf({xa})[0];
  (void)autograd::grad({again}, {xa}, {ones_like(again)});
  REQUIRE_FALSE(test::all_close(again, got));
  REQUIRE(compile::stats().compilations == 2);
  REQUIRE(compile::stats().cache_hits == 3);  // the first backward, then the second forward and backward
}

TEST_CASE("compile: f64 finite differences through a compiled region", "[compile]") {
  Tensor x = test::random_tensor({3, 10}, DType::f64, 20).set_requires_grad(true);
  Tensor w = test::random_tensor({10}, DType::f64, 21).set_requires_grad(true);
  const compile::CompiledFunction cf = compile::compile([](const std::vector<Tensor>& in) {
    Tensor h = in[0] * sigmoid(in[1]) + in[0];
    return std::vector<Tensor>{rms_norm(h, in[1], 1e-6) + softmax(h, -1) * log_softmax(h * 0.5, -1)};
  });
  test::check_gradients([&](const std::vector<Tensor>& in) { return cf(in)[0]; }, {x, w});
}

TEST_CASE("compile: CSE merges equal primitives by typed attributes; DCE drops dead nodes", "[compile]") {
  Tensor x = test::random_tensor({4, 6}, DType::f32, 22);
  auto t = compile::trace(
      [](const std::vector<Tensor>& in) {
        Tensor a = exp(in[0]), b = exp(in[0]);  // equal: merged
        (void)log(in[0]);                       // dead
        return std::vector<Tensor>{a + b, mul(in[0], 2.0) + mul(in[0], 3.0), sum(in[0], {0}), sum(in[0], {1})};
      },
      {x}, false);
  const compile::Graph& g = t->forward;
  REQUIRE(count_ops(g, "exp") == 2);
  REQUIRE(count_ops(g, "log") == 1);
  const compile::Rewrite c = compile::eliminate_common_subexpressions(g);
  REQUIRE(count_ops(c.graph, "exp") == 1);
  REQUIRE(count_ops(c.graph, "fill") == 2);  // 2.0 and 3.0 differ in their value attribute
  REQUIRE(count_ops(c.graph, "mul") == 2);
  REQUIRE(count_ops(c.graph, "sum") == 2);   // dims [0] and [1] differ
  REQUIRE(c.merged.size() == 1);
  REQUIRE(count_ops(c.graph, "log") == 1);
  const compile::Rewrite d = compile::eliminate_dead_code(c.graph);
  REQUIRE(count_ops(d.graph, "log") == 0);
  REQUIRE(count_ops(d.graph, "exp") == 1);
  REQUIRE(d.graph.outputs.size() == 4);
  // a + b now reads one exp twice
  const compile::Node& add = *std::find_if(d.graph.nodes.begin(), d.graph.nodes.end(),
                                           [](const compile::Node& n) { return std::string(n.op->name()) == "add"; });
  REQUIRE(add.inputs[0] == add.inputs[1]);
  // a DCE root keeps a value no output reads
  const compile::Rewrite kept = compile::eliminate_dead_code(g, {g.nodes[2].outputs[0]});
  REQUIRE(count_ops(kept.graph, "log") == 1);
  // the compiled function still computes every output as eager does
  autograd::NoGradGuard ng;
  const auto eager_fn = [](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{exp(in[0]) + exp(in[0]), mul(in[0], 2.0) + mul(in[0], 3.0)};
  };
  const std::vector<Tensor> want = eager_fn({x}), got = compile::compile(eager_fn)({x});
  for (size_t i = 0; i < want.size(); ++i) test::require_close(got[i], want[i]);
}

namespace {

// An op the fuser does not know: x^3, with a CPU kernel and a vjp.
struct TestCube final : Primitive {
  const char* name() const override { return "test_cube"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& in) const override {
    return {{in[0].shape(), in[0].dtype(), in[0].device()}};
  }
  bool differentiable() const override { return true; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override {
    return {cot[0] * square(in[0]) * 3.0};
  }
};

Tensor test_cube(const Tensor& x) {
  static const bool registered = [] {
    register_kernel(std::type_index(typeid(TestCube)), DeviceType::cpu,
                    [](const Primitive&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
                      Tensor x = in[0].contiguous();
                      const float* xp = x.data_ptr<float>();
                      float* op = out[0].data_ptr<float>();
                      for (int64_t i = 0; i < x.numel(); ++i) op[i] = xp[i] * xp[i] * xp[i];
                    });
    return true;
  }();
  (void)registered;
  return dispatch1(std::make_shared<const TestCube>(), {x});
}

}  // namespace

TEST_CASE("compile: an op the fuser does not know runs eagerly inside the plan, counted as a fallback", "[compile]") {
  Tensor x = test::random_tensor({5, 7}, DType::f32, 23).set_requires_grad(true);
  auto f = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{(test_cube(in[0] * 0.5 + 1.0) - in[0]) * 2.0}; };
  compile::reset_stats();
  require_matches_eager(f, {x});
  const compile::Stats s = compile::stats();
  REQUIRE(s.fallback_ops >= 1);
  REQUIRE(s.last_forward_groups == 2);   // before and after the unknown op
  REQUIRE(s.last_forward_kernels == 3);
  REQUIRE(s.eager_calls == 0);
}

TEST_CASE("compile: a function that writes in place runs eagerly, with the same results", "[compile]") {
  Tensor buf = zeros({3});
  auto f = [&](const std::vector<Tensor>& in) {
    Tensor y = in[0] * 2.0;
    copy_(buf, y);
    return std::vector<Tensor>{y + buf};
  };
  Tensor x = test::random_tensor({3}, DType::f32, 24);
  compile::reset_stats();
  autograd::NoGradGuard ng;
  Tensor got = compile::compile(f)({x})[0];
  REQUIRE(compile::stats().eager_calls == 1);
  test::require_close(got, x * 4.0);
  test::require_close(buf, x * 2.0);
}

TEST_CASE("compile: a size seen to change becomes symbolic after its second value", "[compile]") {
  const compile::CompiledFunction cf = compile::compile([](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{softmax(in[0] * 2.0 + 1.0, -1)};
  });
  compile::reset_stats();
  autograd::NoGradGuard ng;
  for (int64_t t : {3, 4, 5, 6, 3}) {
    const Tensor x = test::random_tensor({t, 16}, DType::f32, static_cast<uint64_t>(t));
    test::require_close(cf({x})[0], softmax(x * 2.0 + 1.0, -1));
  }
  REQUIRE(compile::stats().compilations == 2);   // static at first, symbolic after the change
  REQUIRE(compile::stats().recompilations == 1);
  REQUIRE(compile::stats().cache_hits == 3);
  // a change of the other (fixed) size recompiles once more, then serves both
  for (int64_t d : {8, 16, 24}) {
    const Tensor x = test::random_tensor({4, d}, DType::f32, static_cast<uint64_t>(d));
    test::require_close(cf({x})[0], softmax(x * 2.0 + 1.0, -1));
  }
  REQUIRE(compile::stats().compilations == 3);
  // rank is structure: a new plan, not a guard failure
  const Tensor x3 = test::random_tensor({2, 3, 16}, DType::f32, 9);
  test::require_close(cf({x3})[0], softmax(x3 * 2.0 + 1.0, -1));
  REQUIRE(compile::stats().compilations == 4);
  REQUIRE(compile::stats().recompilations == 2);
}

TEST_CASE("compile: the CUDA source of a group includes only kiln's functors and lays out its arguments", "[compile]") {
  Tensor x = test::random_tensor({2, 7, 32}, DType::bf16, 25), r = test::random_tensor({2, 7, 32}, DType::bf16, 26);
  Tensor w = test::random_tensor({32}, DType::bf16, 27);
  autograd::NoGradGuard ng;
  auto t = compile::trace(
      [&](const std::vector<Tensor>& in) {
        Tensor h = in[0] + in[1];
        return std::vector<Tensor>{rms_norm(h, w, 1e-6), dropout(h * 2.0, 0.1)};
      },
      {x, r}, false);
  compile::PlanInput in;
  in.graph = &t->forward;
  const compile::Plan plan = compile::build_plan(in);
  REQUIRE(plan.fusion.groups.size() == 1);
  const compile::Program& p = plan.fusion.groups[0].program;
  REQUIRE(p.row);
  REQUIRE(p.rng_nodes.size() == 1);
  compile::Variant v;
  v.rank = 3;
  v.row_length = 32;
  v.block = 32;
  const std::string src = compile::generate_cuda(p, v);
  REQUIRE_THAT(src, ContainsSubstring("#include \"core/functors.h\""));
  REQUIRE_THAT(src, ContainsSubstring("#include \"core/philox.h\""));
  REQUIRE_THAT(src, ContainsSubstring("kiln_block_reduce"));
  REQUIRE_THAT(src, ContainsSubstring("kiln::philox::uniform_bits"));
  REQUIRE_THAT(src, ContainsSubstring("const I D = (I)32;"));  // the fixed row length is baked in
  REQUIRE(src.find("std::") == std::string::npos);
  REQUIRE(src.find("fmt") == std::string::npos);
  int includes = 0;
  for (size_t at = src.find("#include"); at != std::string::npos; at = src.find("#include", at + 1)) ++includes;
  REQUIRE(includes == 2);
  const compile::ArgLayout l = compile::arg_layout(p, v);
  // rows, D, 2 row sizes; per input a pointer and its strides; outputs; seed and offset
  int want = 2 + 2;
  for (const auto& slot : p.inputs) want += 1 + (slot.level == compile::Level::element ? 3 : 2);
  want += static_cast<int>(p.outputs.size()) + 2;
  REQUIRE(l.words == want);
  // a pointwise variant reads contiguous inputs at the element index, strided ones through coordinates
  auto tp = compile::trace([](const std::vector<Tensor>& in) { return std::vector<Tensor>{exp(in[0]) * in[1] + 1.0}; },
                           {x, w}, false);
  compile::PlanInput pin;
  pin.graph = &tp->forward;
  const compile::Plan pp = compile::build_plan(pin);
  REQUIRE(pp.fusion.groups.size() == 1);
  compile::Variant pv;
  pv.rank = 3;
  pv.index32 = true;
  pv.access = {compile::Access::contiguous, compile::Access::strided};
  const std::string ps = compile::generate_cuda(pp.fusion.groups[0].program, pv);
  REQUIRE_THAT(ps, ContainsSubstring("typedef unsigned int I;"));
  REQUIRE_THAT(ps, ContainsSubstring("const I x0 = i;"));
  REQUIRE_THAT(ps, ContainsSubstring("c0 * st1_0 + c1 * st1_1 + c2 * st1_2"));
  REQUIRE(ps.find("philox") == std::string::npos);
  REQUIRE(ps != compile::generate_cuda(pp.fusion.groups[0].program, [&] {
    compile::Variant c = pv;
    c.access[1] = compile::Access::scalar;
    return c;
  }()));
}

TEST_CASE("compile: the kernel disk cache keys by content, writes atomically and evicts the least recently used", "[compile]") {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / fmt::format("kiln_cache_test_{}", ::getpid());
  std::filesystem::remove_all(dir);
  const compile::DiskCache c(dir.string(), 2500);
  REQUIRE_FALSE(c.get("a").has_value());
  c.put("a", std::string(1000, 'x'));
  c.put("b", std::string(1000, 'y'));
  REQUIRE(c.get("a") == std::string(1000, 'x'));
  REQUIRE(c.get("b") == std::string(1000, 'y'));
  // the file holds its key: the same name with another key inside reads as a miss
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    ++files;
    REQUIRE(e.path().extension() == ".kbin");  // no temporary files left behind
  }
  REQUIRE(files == 2);
  // touch "a" (a hit), then a third entry pushes the folder over 2500 bytes: "b", the least recently used, goes
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(c.get("a").has_value());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  c.put("c", std::string(1000, 'z'));
  REQUIRE(c.get("a").has_value());
  REQUIRE_FALSE(c.get("b").has_value());
  REQUIRE(c.get("c").has_value());
  REQUIRE(c.size_bytes() <= 2500);
  // the environment names the folder
  ::setenv("KILN_CACHE_DIR", dir.string().c_str(), 1);
  REQUIRE(compile::DiskCache::from_environment().dir() == (dir / "compile").string());
  ::unsetenv("KILN_CACHE_DIR");
  std::filesystem::remove_all(dir);
}

TEST_CASE("compile: the forward keeps GEMM outputs and row results for backward and recomputes pointwise work", "[compile]") {
  Tensor x = test::random_tensor({4, 8}, DType::f32, 60).set_requires_grad(true);
  Tensor w = test::random_tensor({8, 8}, DType::f32, 61).set_requires_grad(true);
  auto f = [](const std::vector<Tensor>& in) {
    Tensor h = matmul(in[0], in[1]);  // kept: the vjp of exp(h) * h reads it
    Tensor a = exp(h) * h;            // exp(h) and a are read too: recomputed from h
    Tensor s = softmax(a, -1);        // softmax's vjp reads s: kept (a row result)
    return std::vector<Tensor>{s * a};
  };
  auto t = compile::trace(f, {x, w});
  auto produced_by = [&](const char* name) {
    for (const compile::Node& n : t->forward.nodes)
      if (std::string(n.op->name()) == name) return n.outputs[0];
    return -1;
  };
  const std::vector<int> kept = compile::choose_kept(t->forward, t->backward);
  auto has = [&](int v) { return std::find(kept.begin(), kept.end(), v) != kept.end(); };
  REQUIRE(has(produced_by("matmul")));
  REQUIRE(has(produced_by("softmax")));
  REQUIRE_FALSE(has(produced_by("exp")));
  REQUIRE(kept.size() == 2);
  // the backward recomputes exp(h) * h (inside a group with the vjps' pointwise work)
  const compile::Graph joint = compile::backward_with_recompute(t->forward, t->backward, kept);
  int recomputed = 0;
  for (const compile::Node& n : joint.nodes) recomputed += n.origin.trace == 0;
  REQUIRE(recomputed == 2);  // exp, mul
  REQUIRE(count_ops(joint, "exp") == 1);
  // f32 through exp(h) * h (up to ~60) and a softmax over it: the recomputed chain rounds apart from
  // eager's by up to ~4e-5 relative (seen once in a full CI run at 1.7e-5 on 0.47).
  require_matches_eager(f, {x, w}, 1e-4, 1e-6);
}

TEST_CASE("compile: a checkpoint's recompute runs a compiled call without its unread outputs, in full once read", "[compile]") {
  // y = (sin(x) @ w1) @ w2: the backward reads sin(x) @ w1 (kept) and not y, so the recompute leaves
  // the last GEMM out; a recompute that then reads y (squares it) gets it computed.
  Tensor x = test::random_tensor({5, 6}, DType::f64, 70).set_requires_grad(true);
  Tensor w1 = test::random_tensor({6, 4}, DType::f64, 71).set_requires_grad(true);
  Tensor w2 = test::random_tensor({4, 3}, DType::f64, 72).set_requires_grad(true);
  const Tensor seed = test::random_tensor({5, 3}, DType::f64, 73);  // d loss / d output
  const compile::CompiledFunction f = compile::compile([](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{matmul(matmul(sin(in[0]), in[1]), in[2])};
  });
  bool square = false;  // whether the function squares y (set between the forward and the recompute)
  const autograd::CheckpointFn block = [&](const std::vector<Tensor>& in) {
    const Tensor y = f({in[0], w1, w2})[0];
    return std::vector<Tensor>{square ? y * y : y};
  };
  // The gradients of sum(seed * out) and the GEMMs its backward ran.
  auto run = [&](bool checkpointed, bool square_in_recompute) {
    for (Tensor* t : {&x, &w1, &w2}) t->zero_grad();
    square = false;
    const Tensor out = checkpointed ? autograd::checkpoint(block, {x})[0] : block({x})[0];
    square = square_in_recompute;
    test::KernelCounter counter;
    {
      HandlerScope scope(&counter);
      autograd::backward({out}, {seed});
    }
    return std::pair{std::vector<Tensor>{x.grad().clone(), w1.grad().clone(), w2.grad().clone()}, counter.count("matmul")};
  };
  const auto [plain, plain_gemms] = run(false, false);
  const auto [ck, ck_gemms] = run(true, false);
  for (size_t i = 0; i < plain.size(); ++i) test::require_close(ck[i], plain[i], 1e-12, 1e-14);
  CHECK(ck_gemms - plain_gemms == 1);  // the recompute: sin(x) @ w1 only
  // Squared in the recompute: y is read, so the call is run in full and y filled in (the gradients of
  // sum(seed * y * y)).
  const auto [squared, squared_gemms] = run(true, true);
  const Tensor y = matmul(matmul(sin(x.detach()), w1.detach()), w2.detach());
  const Tensor dy = 2.0 * y * seed;  // (5, 3)
  const Tensor dh = matmul(dy, w2.detach().t());  // (5, 4)
  test::require_close(squared[0], matmul(dh, w1.detach().t()) * cos(x.detach()), 1e-12, 1e-14);
  test::require_close(squared[1], matmul(sin(x.detach()).t(), dh), 1e-12, 1e-14);
  test::require_close(squared[2], matmul(matmul(sin(x.detach()), w1.detach()).t(), dy), 1e-12, 1e-14);
  CHECK(squared_gemms - plain_gemms == 3);  // the kept-only plan's GEMM, then both when y is read
  // A compiled call whose backward reads its output (exp's vjp reads exp's value) computes it in the
  // recompute: the gradients of a checkpoint over it are the plain ones.
  const compile::CompiledFunction g = compile::compile([](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{exp(matmul(sin(in[0]), in[1]))};
  });
  auto grads_of = [&](bool checkpointed) {
    for (Tensor* t : {&x, &w1}) t->zero_grad();
    const autograd::CheckpointFn fn = [&](const std::vector<Tensor>& in) { return g({in[0], w1}); };
    const Tensor out = checkpointed ? autograd::checkpoint(fn, {x})[0] : fn({x})[0];
    autograd::backward({out}, {test::random_tensor(out.shape(), DType::f64, 74)});
    return std::vector<Tensor>{x.grad().clone(), w1.grad().clone()};
  };
  const std::vector<Tensor> want = grads_of(false), got = grads_of(true);
  for (size_t i = 0; i < want.size(); ++i) test::require_close(got[i], want[i], 1e-12, 1e-14);
}

TEST_CASE("compile: a random op inside a compiled function draws eager's numbers, fresh ones each call", "[compile]") {
  Tensor x = test::random_tensor({3, 6}, DType::f32, 62);
  auto f = [](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{in[0] + rand(in[0].shape()) * 0.1 + randn(in[0].shape()) * 0.01};
  };
  autograd::NoGradGuard ng;
  const compile::CompiledFunction cf = compile::compile(f);
  manual_seed(5);
  const Tensor e1 = f({x})[0], e2 = f({x})[0];
  manual_seed(5);
  compile::reset_stats();
  const Tensor c1 = cf({x})[0], c2 = cf({x})[0];
  test::require_equal(c1, e1);
  test::require_equal(c2, e2);
  REQUIRE_FALSE(test::all_close(c1, c2));
  REQUIRE(compile::stats().compilations == 1);
}

TEST_CASE("compile: a tensor a module caches while traced is real (copies of captured tensors run)", "[compile]") {
  Tensor w = test::random_tensor({5}, DType::f32, 63);
  Tensor cached;  // filled on the first call, as RotaryEmbedding fills its tables
  auto f = [&](const std::vector<Tensor>& in) {
    if (!cached.defined()) cached = cast(w, DType::f64);
    return std::vector<Tensor>{in[0] * cast(cached, DType::f32) + 1.0};
  };
  autograd::NoGradGuard ng;
  const Tensor x = test::random_tensor({3, 5}, DType::f32, 64);
  const Tensor got = compile::compile(f)({x})[0];
  REQUIRE(cached.storage() != nullptr);
  test::require_close(cached, w.to(DType::f64));
  test::require_close(got, x * w + 1.0);
}

TEST_CASE("compile: strided, broadcast and bf16 inputs read as eager reads them", "[compile]") {
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    INFO(dtype_name(dt));
    const double tol = dt == DType::bf16 ? 1e-2 : 1e-5;
    Tensor x = test::random_tensor({4, 6, 10}, dt, 70, /*noncontiguous=*/true).set_requires_grad(true);
    Tensor y = test::random_tensor({6, 1}, dt, 71).set_requires_grad(true);
    Tensor w = test::random_tensor({10}, dt, 72, true).set_requires_grad(true);
    REQUIRE_FALSE(x.is_contiguous());
    auto f = [](const std::vector<Tensor>& in) {
      Tensor h = in[0] * in[1] + expand(in[2], {6, 10});     // (4, 6, 10)
      Tensor t = transpose(in[0], 0, 2);                       // a strided view inside the function
      return std::vector<Tensor>{rms_norm(h, in[2], 1e-5), softmax(t * 2.0, -1), sum(h, {-1}, true) - mean(h, {-1}, true)};
    };
    require_matches_eager(f, {x, y, w}, tol, tol);
  }
}

// Optimisers on the CPU: AdamW and SGD against independent float64 loops of torch's formulas (many
// sizes, f32/bf16 params, weight decay on/off, params without grad), the adamw_step_ primitive's
// checks, clip_grad_norm_, LR schedules, state save/load (bit-identical resume, bad states), and the
// multi-tensor L2 norm / scale primitives against float64 references.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "core/ops/optim.h"
#include "nn/lr_schedule.h"
#include "nn/optim.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
using kiln::test::make_noncontiguous;
using kiln::test::random_tensor;
using kiln::test::require_close;
using kiln::test::require_equal;

namespace {

std::vector<double> to_f64(const Tensor& t) { return cast(t, DType::f64).contiguous().to_vector<double>(); }
Tensor f64_tensor(const std::vector<double>& v, const Shape& s) { return from_vector<double>(v, s); }
double round_to(double x, DType dt) {
  if (dt == DType::bf16) return static_cast<float>(bf16(static_cast<float>(x)));
  if (dt == DType::f16) return static_cast<float>(f16(static_cast<float>(x)));
  return static_cast<float>(x);
}

// torch.optim.AdamW for one tensor in float64; the param is rounded to its dtype after each update.
struct RefAdamW {
  std::vector<double> p, m, v;
  int64_t t = 0;
  void step(const std::vector<double>& g, const AdamWHyper& h, DType dt) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    ++t;
    const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(t));
    for (size_t i = 0; i < p.size(); ++i) {
      double x = p[i] * (1.0 - h.lr * h.weight_decay);
      m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
      v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
      x -= h.lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + h.eps);
      p[i] = round_to(x, dt);
    }
  }
};

const std::vector<Shape> kShapes = {{1}, {3}, {7, 5}, {4, 16}, {33, 17}, {3, 1, 129}, {100003}};

nn::NamedTensors make_params(DType dt, uint64_t seed) {
  nn::NamedTensors ps;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    Tensor p = random_tensor(kShapes[i], dt, seed + i);
    p.set_requires_grad(true);
    ps.emplace_back("layers." + std::to_string(i) + ".weight", p);
  }
  return ps;
}

// Fresh random grads for step s; param k gets none on steps where (s + k) % 4 == 0.
void set_grads(const nn::NamedTensors& ps, int s, uint64_t seed, bool skip_some = true) {
  for (size_t k = 0; k < ps.size(); ++k) {
    Tensor p = ps[k].second;
    if (skip_some && (s + static_cast<int>(k)) % 4 == 0) p.zero_grad();
    else p.set_grad(random_tensor(p.shape(), p.dtype(), seed * 1000 + static_cast<uint64_t>(s * 37) + k));
  }
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("kiln_optim_" + name + ".safetensors")).string();
}

}  // namespace

TEST_CASE("AdamW matches a float64 loop of torch's formulas", "[optim]") {
  for (DType dt : {DType::f32, DType::bf16}) {
    for (double wd : {0.0, 0.1}) {
      CAPTURE(dtype_name(dt), wd);
      nn::NamedTensors ps = make_params(dt, 10);
      const AdamWHyper h{2e-2, 0.8, 0.95, 1e-6, wd};
      nn::AdamW opt(ps, {h.lr, h.beta1, h.beta2, h.eps, h.weight_decay});
      std::vector<RefAdamW> ref(ps.size());
      for (size_t k = 0; k < ps.size(); ++k) ref[k].p = to_f64(ps[k].second);
      for (int s = 1; s <= 6; ++s) {
        set_grads(ps, s, 20);
        for (size_t k = 0; k < ps.size(); ++k) {
          if (ps[k].second.grad().defined()) ref[k].step(to_f64(ps[k].second.grad()), h, dt);
        }
        opt.step();
      }
      REQUIRE(opt.step_count() == 6);
      for (size_t k = 0; k < ps.size(); ++k) {
        CAPTURE(ps[k].first);
        const Tensor& p = ps[k].second;
        REQUIRE(p.dtype() == dt);
        if (dt == DType::f32) require_close(p, f64_tensor(ref[k].p, p.shape()), 1e-5, 1e-6);
        else require_close(p, f64_tensor(ref[k].p, p.shape()), 8e-3, 1e-3);  // one bf16 rounding may differ
        const auto& st = opt.state(ps[k].first);
        REQUIRE(st.at("exp_avg").dtype() == DType::f32);
        require_close(st.at("exp_avg"), f64_tensor(ref[k].m, p.shape()), 1e-5, 1e-6);
        require_close(st.at("exp_avg_sq"), f64_tensor(ref[k].v, p.shape()), 1e-5, 1e-7);
        REQUIRE(opt.state_dict().tensors.at(ps[k].first + ".step").item<int64_t>() == ref[k].t);
      }
    }
  }
}

TEST_CASE("AdamW leaves params without grad and their state untouched", "[optim]") {
  nn::NamedTensors ps = make_params(DType::f32, 30);
  const Tensor before = ps[2].second.clone();
  nn::AdamW opt(ps, {});
  for (int s = 0; s < 3; ++s) {
    set_grads(ps, s, 31, false);
    ps[2].second.zero_grad();
    opt.step();
  }
  require_equal(ps[2].second, before);
  REQUIRE(opt.state(ps[2].first).empty());
  REQUIRE(opt.state_dict().tensors.count(ps[2].first + ".exp_avg") == 0);
  REQUIRE(opt.state(ps[0].first).size() == 2);
}

TEST_CASE("adamw_step_ checks its lists and writes in place", "[optim]") {
  Tensor p = random_tensor({5, 6}, DType::f32, 40), g = random_tensor({6, 5}, DType::f32, 41, true).t();
  Tensor m = zeros({5, 6}), v = zeros({5, 6});
  const AdamWHyper h{1e-2, 0.9, 0.999, 1e-8, 0.0};
  // A non-contiguous grad gives the same result as its contiguous copy.
  Tensor p2 = p.clone(), m2 = zeros({5, 6}), v2 = zeros({5, 6});
  adamw_step_({p}, {g}, {m}, {v}, {1}, h);
  adamw_step_({p2}, {g.contiguous()}, {m2}, {v2}, {1}, h);
  require_equal(p, p2);
  require_equal(m, m2);
  // First step from zero state: m = (1-b1) g, v = (1-b2) g^2, update = lr * g / (|g| + eps') ~ lr sign(g).
  require_close(m, mul(g, 0.1), 1e-6, 1e-7);
  REQUIRE_THROWS_WITH(adamw_step_({p}, {g}, {m}, {}, {1}, h), ContainsSubstring("[adamw_step]"));
  REQUIRE_THROWS_WITH(adamw_step_({p}, {g}, {m}, {v}, {0}, h), ContainsSubstring("[adamw_step] step"));
  REQUIRE_THROWS_WITH(adamw_step_({p}, {g}, {cast(m, DType::f64)}, {v}, {1}, h), ContainsSubstring("[adamw_step]"));
  REQUIRE_THROWS_WITH(adamw_step_({p.t()}, {g.t()}, {m.t()}, {v.t()}, {1}, h), ContainsSubstring("contiguous"));
  REQUIRE_THROWS_WITH(adamw_step_({p}, {random_tensor({5, 7}, DType::f32, 42)}, {m}, {v}, {1}, h),
                      ContainsSubstring("[adamw_step] grad 0"));
  REQUIRE_THROWS_WITH(adamw_step_({p}, {g}, {m}, {v}, {1}, AdamWHyper{1e-2, 1.0, 0.999, 1e-8, 0.0}),
                      ContainsSubstring("betas"));
  Tensor leaf = random_tensor({5, 6}, DType::f32, 43);
  leaf.set_requires_grad(true);
  REQUIRE_THROWS_WITH(adamw_step_({leaf}, {g}, {m}, {v}, {1}, h), ContainsSubstring("requires grad"));
}

TEST_CASE("SGD variants match a float64 loop of torch's formulas", "[optim]") {
  struct Case {
    nn::SGDOptions o;
    DType dt;
  };
  const std::vector<Case> cases = {{{0.1, 0.0, 0.0, false, 0.0}, DType::f32},
                                   {{0.05, 0.9, 0.0, false, 0.01}, DType::f32},
                                   {{0.05, 0.9, 0.3, false, 0.0}, DType::f32},
                                   {{0.05, 0.8, 0.0, true, 0.02}, DType::f32},
                                   {{0.05, 0.9, 0.1, false, 0.01}, DType::bf16}};
  for (const Case& c : cases) {
    CAPTURE(c.o.momentum, c.o.dampening, c.o.nesterov, c.o.weight_decay, dtype_name(c.dt));
    nn::NamedTensors ps = make_params(c.dt, 50);
    nn::SGD opt(ps, c.o);
    std::vector<std::vector<double>> p(ps.size()), buf(ps.size());
    for (size_t k = 0; k < ps.size(); ++k) p[k] = to_f64(ps[k].second);
    for (int s = 1; s <= 5; ++s) {
      set_grads(ps, s, 51);
      for (size_t k = 0; k < ps.size(); ++k) {
        if (!ps[k].second.grad().defined()) continue;
        std::vector<double> d = to_f64(ps[k].second.grad());
        for (size_t i = 0; i < d.size(); ++i) d[i] += c.o.weight_decay * p[k][i];
        if (c.o.momentum != 0.0) {
          if (buf[k].empty()) buf[k] = d;
          else
            for (size_t i = 0; i < d.size(); ++i) buf[k][i] = c.o.momentum * buf[k][i] + (1 - c.o.dampening) * d[i];
          for (size_t i = 0; i < d.size(); ++i) d[i] = c.o.nesterov ? d[i] + c.o.momentum * buf[k][i] : buf[k][i];
        }
        for (size_t i = 0; i < d.size(); ++i) p[k][i] = round_to(p[k][i] - c.o.lr * d[i], c.dt);
      }
      opt.step();
    }
    for (size_t k = 0; k < ps.size(); ++k) {
      CAPTURE(ps[k].first);
      // bf16: the kernel rounds f32 results, the loop f64 ones; near a rounding boundary they pick
      // neighbouring bf16 values, and over 5 steps (momentum, weight decay) a rare element drifts a few ulps.
      const double rtol = c.dt == DType::f32 ? 1e-5 : 3e-2;
      const double atol = c.dt == DType::f32 ? 1e-5 : 1e-3;
      require_close(ps[k].second, f64_tensor(p[k], ps[k].second.shape()), rtol, atol);
      // With bf16 parameters the kernel (f32 math, then rounding) and the loop (f64, then rounding) can
      // round a parameter to neighbouring bf16 values; weight decay carries that ulp into the buffer.
      const double buf_tol = c.dt == DType::f32 ? 1e-5 : 2e-4;
      if (c.o.momentum != 0.0) require_close(opt.state(ps[k].first).at("momentum_buffer"),
                                             f64_tensor(buf[k], ps[k].second.shape()), buf_tol, buf_tol);
    }
  }
  REQUIRE_THROWS_WITH(nn::SGD(make_params(DType::f32, 1), {0.1, 0.0, 0.0, true, 0.0}), ContainsSubstring("[sgd] nesterov"));
  REQUIRE_THROWS_WITH(nn::SGD(make_params(DType::f32, 1), {-0.1, 0.0, 0.0, false, 0.0}), ContainsSubstring("[sgd] lr"));
}

TEST_CASE("clip_grad_norm_ scales grads above max_norm only", "[optim]") {
  for (DType dt : {DType::f32, DType::bf16}) {
    nn::NamedTensors ps = make_params(dt, 60);
    set_grads(ps, 1, 61);  // some params have no grad
    double ref_sq = 0.0;
    std::vector<Tensor> before;
    for (const auto& [n, p] : ps) {
      before.push_back(p.grad().defined() ? p.grad().clone() : Tensor());
      if (p.grad().defined())
        for (double x : to_f64(p.grad())) ref_sq += x * x;
    }
    const double ref = std::sqrt(ref_sq);
    // Above the norm: unchanged.
    REQUIRE(nn::clip_grad_norm_(ps, 2 * ref) == Catch::Approx(ref).epsilon(1e-5));
    for (size_t k = 0; k < ps.size(); ++k)
      if (before[k].defined()) require_equal(ps[k].second.grad(), before[k]);
    // Below: scaled by max/(norm + 1e-6), so the new norm is max_norm.
    const double max_norm = ref / 7.0;
    REQUIRE(nn::clip_grad_norm_(ps, max_norm) == Catch::Approx(ref).epsilon(1e-5));
    const double coef = max_norm / (ref + 1e-6);
    for (size_t k = 0; k < ps.size(); ++k) {
      if (!before[k].defined()) continue;
      std::vector<double> want = to_f64(before[k]);
      for (double& x : want) x = round_to(x * coef, dt);
      require_close(ps[k].second.grad(), f64_tensor(want, before[k].shape()), dt == DType::f32 ? 1e-5 : 8e-3, 1e-6);
    }
    REQUIRE(nn::clip_grad_norm_(ps, 1e9) == Catch::Approx(max_norm).epsilon(1e-3));
  }
  REQUIRE(nn::clip_grad_norm_(std::vector<Tensor>{zeros({3})}, 1.0) == 0.0);  // no grads
  REQUIRE_THROWS_WITH(nn::clip_grad_norm_(make_params(DType::f32, 1), 0.0), ContainsSubstring("[clip_grad_norm]"));
}

TEST_CASE("LR schedules follow transformers' warmup formulas", "[optim]") {
  const double pi = std::acos(-1.0);
  nn::LRSchedule c("constant", 3e-4, 10), l("linear", 3e-4, 10, 110), k("cosine", 3e-4, 10, 110);
  for (const nn::LRSchedule* s : {&c, &l, &k}) {
    CAPTURE(s->name());
    REQUIRE(s->multiplier(0) == 0.0);
    REQUIRE(s->multiplier(5) == Catch::Approx(0.5));
    REQUIRE(s->lr_at(9) == Catch::Approx(3e-4 * 0.9));
    REQUIRE(s->multiplier(10) == Catch::Approx(1.0));
  }
  REQUIRE(c.multiplier(1000) == 1.0);
  REQUIRE(l.multiplier(60) == Catch::Approx(0.5));
  REQUIRE(l.multiplier(85) == Catch::Approx(0.25));
  REQUIRE(l.multiplier(110) == 0.0);
  REQUIRE(l.multiplier(500) == 0.0);
  REQUIRE(k.multiplier(60) == Catch::Approx(0.5));
  REQUIRE(k.multiplier(35) == Catch::Approx(0.5 * (1 + std::cos(pi / 4))));
  REQUIRE(k.multiplier(110) == Catch::Approx(0.0).margin(1e-12));
  REQUIRE(k.lr_at(85) == Catch::Approx(3e-4 * 0.5 * (1 + std::cos(3 * pi / 4))));
  nn::LRSchedule nw("cosine", 1.0, 0, 4);
  REQUIRE(nw.multiplier(0) == 1.0);
  REQUIRE(nw.multiplier(2) == Catch::Approx(0.5));
  REQUIRE_THROWS_WITH(nn::LRSchedule("step", 1e-3, 0, 10), ContainsSubstring("[lr_schedule] unknown schedule 'step'"));
  REQUIRE_THROWS_WITH(nn::LRSchedule("linear", 1e-3, 20, 10), ContainsSubstring("[lr_schedule]"));
  REQUIRE_THROWS_WITH(nn::LRSchedule("linear", 1e-3, -1, 10), ContainsSubstring("[lr_schedule] warmup_steps"));
}

TEST_CASE("optimizer state save/load resumes bit-identically", "[optim]") {
  auto run = [](const char* kind, DType dt) {
    CAPTURE(kind, dtype_name(dt));
    auto make = [&](nn::NamedTensors ps) -> std::unique_ptr<nn::Optimizer> {
      if (std::string(kind) == "AdamW") return std::make_unique<nn::AdamW>(ps, nn::AdamWOptions{3e-2, 0.85, 0.99, 1e-7, 0.05});
      return std::make_unique<nn::SGD>(ps, nn::SGDOptions{3e-2, 0.9, 0.1, false, 0.05});
    };
    nn::NamedTensors a = make_params(dt, 70);
    auto opt_a = make(a);
    for (int s = 1; s <= 3; ++s) set_grads(a, s, 71), opt_a->step();
    opt_a->set_lr(1.7e-2);
    const std::string path = temp_path(kind);
    opt_a->save(path);
    nn::NamedTensors b;
    for (const auto& [n, p] : a) b.emplace_back(n, p.clone().set_requires_grad(true));
    auto opt_b = make(b);
    opt_b->load(path);
    REQUIRE(opt_b->lr() == 1.7e-2);
    REQUIRE(opt_b->step_count() == 3);
    for (int s = 4; s <= 6; ++s) {
      set_grads(a, s, 71), opt_a->step();
      set_grads(b, s, 71), opt_b->step();
    }
    for (size_t k = 0; k < a.size(); ++k) {
      require_equal(a[k].second, b[k].second);
      for (const auto& [key, t] : opt_a->state(a[k].first)) require_equal(opt_b->state(b[k].first).at(key), t);
    }
    std::filesystem::remove(path);
  };
  run("AdamW", DType::f32);
  run("AdamW", DType::bf16);
  run("SGD", DType::f32);
}

TEST_CASE("loading a mismatched optimizer state fails and changes nothing", "[optim]") {
  nn::NamedTensors ps = make_params(DType::f32, 80);
  nn::AdamW opt(ps, {1e-2, 0.9, 0.999, 1e-8, 0.0});
  set_grads(ps, 1, 81, false);
  opt.step();
  const nn::OptimizerState good = opt.state_dict();
  const std::string name = ps[3].first;
  auto snapshot = [&] {
    std::map<std::string, Tensor> s;
    for (const auto& [k, t] : opt.state_dict().tensors) s[k] = t.clone();
    return s;
  };
  const auto before = snapshot();
  auto expect_fail = [&](const nn::OptimizerState& s, const std::string& what) {
    REQUIRE_THROWS_WITH(opt.load_state_dict(s), ContainsSubstring("[optim]") && ContainsSubstring(what));
    REQUIRE(opt.lr() == 1e-2);
    REQUIRE(opt.step_count() == 1);
    const auto now = opt.state_dict().tensors;
    REQUIRE(now.size() == before.size());
    for (const auto& [k, t] : before) require_equal(now.at(k), t);
  };
  nn::OptimizerState s = good;
  s.hyper["lr"] = 5.0;  // every bad state below also carries other hyperparameters, which must not stick
  nn::OptimizerState bad = s;
  bad.type = "SGD";
  expect_fail(bad, "SGD");
  bad = s, bad.params.erase(bad.params.begin() + 3);
  expect_fail(bad, name);
  bad = s, bad.params.push_back("extra.weight");
  expect_fail(bad, "extra.weight");
  bad = s, bad.tensors[name + ".exp_avg"] = zeros({2, 2});
  expect_fail(bad, name);
  bad = s, bad.tensors.erase(name + ".exp_avg_sq");
  expect_fail(bad, name + ".exp_avg_sq");
  bad = s, bad.tensors["nope.exp_avg"] = zeros({1});
  expect_fail(bad, "nope.exp_avg");
  bad = s, bad.tensors[name + ".momentum_buffer"] = zeros(ps[3].second.shape());
  expect_fail(bad, "momentum_buffer");
  bad = s, bad.tensors[name + ".exp_avg"] = cast(bad.tensors[name + ".exp_avg"], DType::bf16);
  expect_fail(bad, name);
  bad = s, bad.hyper["beta1"] = 1.5;
  REQUIRE_THROWS_WITH(opt.load_state_dict(bad), ContainsSubstring("[adamw] betas"));
  REQUIRE(opt.lr() == 1e-2);
  // A file from another optimizer type, and a file that is not an optimizer state.
  nn::SGD sgd(ps, {0.1, 0.9, 0.0, false, 0.0});
  const std::string p1 = temp_path("sgd_bad"), p2 = temp_path("plain");
  sgd.save(p1);
  REQUIRE_THROWS_WITH(opt.load(p1), ContainsSubstring("[optim]") && ContainsSubstring("SGD"));
  io::save_safetensors(p2, {{"x", zeros({2})}});
  REQUIRE_THROWS_WITH(opt.load(p2), ContainsSubstring("[optim]") && ContainsSubstring("format"));
  std::filesystem::remove(p1);
  std::filesystem::remove(p2);
  // The good state still loads.
  opt.load_state_dict(good);
  REQUIRE(opt.step_count() == 1);
}

TEST_CASE("Optimizer basics: lr, zero_grad, bad parameter lists", "[optim]") {
  nn::NamedTensors ps = make_params(DType::f32, 90);
  set_grads(ps, 1, 91, false);
  nn::AdamW opt(ps, {});
  REQUIRE(opt.lr() == 1e-3);
  opt.set_lr(2e-4);
  REQUIRE(opt.lr() == 2e-4);
  REQUIRE(opt.options().lr == 2e-4);
  REQUIRE_THROWS_WITH(opt.set_lr(-1.0), ContainsSubstring("[optim] lr"));
  opt.zero_grad();
  for (const auto& [n, p] : ps) REQUIRE_FALSE(p.grad().defined());
  opt.step();  // nothing to do
  for (const auto& [n, p] : ps) REQUIRE(opt.state(n).empty());
  REQUIRE_THROWS_WITH(nn::AdamW({{"a", zeros({2})}, {"a", zeros({3})}}), ContainsSubstring("[optim] parameter 'a'"));
  REQUIRE_THROWS_WITH(nn::AdamW({{"i", zeros({2}, DType::i64)}}), ContainsSubstring("[optim] parameter 'i'"));
  REQUIRE_THROWS_WITH(nn::AdamW(ps, {1e-3, 0.9, 1.0, 1e-8, 0.0}), ContainsSubstring("[adamw] betas"));
}

// ---- multi-tensor L2 norm and scale

namespace {

// Many sizes around the 16384-element chunk and the 4-element vector width, mixed dtypes.
std::vector<Tensor> norm_inputs(uint64_t seed) {
  const std::vector<int64_t> sizes = {1, 3, 4, 5, 0, 127, 16383, 16384, 16385, 40001, 65536, 2, 9};
  const DType dts[] = {DType::f32, DType::bf16, DType::f16};
  std::vector<Tensor> ts;
  for (size_t i = 0; i < sizes.size(); ++i) ts.push_back(random_tensor({sizes[i]}, dts[i % 3], seed + i));
  ts.push_back(random_tensor({37, 29}, DType::bf16, seed + 99, true));  // a non-contiguous view
  return ts;
}

}  // namespace

TEST_CASE("multi_tensor_l2_norm matches a float64 reference", "[optim]") {
  for (uint64_t seed : {1u, 2u}) {
    const std::vector<Tensor> ts = norm_inputs(seed * 100);
    double sq = 0.0;
    for (const Tensor& t : ts)
      for (double x : to_f64(t)) sq += x * x;
    const Tensor n = multi_tensor_l2_norm(ts);
    REQUIRE(n.dim() == 0);
    REQUIRE(n.dtype() == DType::f32);
    REQUIRE(n.item<double>() == Catch::Approx(std::sqrt(sq)).epsilon(1e-6));
    // One tensor alone, and the same list twice (deterministic).
    REQUIRE(multi_tensor_l2_norm({ts[8]}).item<double>() ==
            Catch::Approx(std::sqrt(sum(square(cast(ts[8], DType::f64))).item<double>())).epsilon(1e-6));
    REQUIRE(multi_tensor_l2_norm(ts).item<float>() == n.item<float>());
  }
  // Non-finite elements give a non-finite norm; only empty tensors give 0.
  Tensor bad = random_tensor({100}, DType::f32, 5);
  bad.data_ptr<float>()[17] = std::numeric_limits<float>::infinity();
  REQUIRE(std::isinf(multi_tensor_l2_norm({random_tensor({10}, DType::bf16, 6), bad}).item<double>()));
  bad.data_ptr<float>()[17] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE(std::isnan(multi_tensor_l2_norm({bad}).item<double>()));
  REQUIRE(multi_tensor_l2_norm({zeros({0}), zeros({3, 0}, DType::bf16)}).item<double>() == 0.0);
  REQUIRE_THROWS_WITH(multi_tensor_l2_norm({}), ContainsSubstring("[multi_tensor_l2_norm]"));
  REQUIRE_THROWS_WITH(multi_tensor_l2_norm({zeros({3}), zeros({3}, DType::f64)}),
                      ContainsSubstring("[multi_tensor_l2_norm] tensors must be f32, bf16 or f16, tensor 1 is f64"));
  REQUIRE_THROWS_WITH(multi_tensor_l2_norm({zeros({3}, DType::i64)}), ContainsSubstring("[multi_tensor_l2_norm]"));
}

TEST_CASE("multi_tensor_scale_ multiplies in f32 and rounds once", "[optim]") {
  std::vector<Tensor> ts = norm_inputs(300);
  ts.pop_back();  // contiguous only
  std::vector<Tensor> before;
  for (const Tensor& t : ts) before.push_back(t.clone());
  const double scale = 0.3137;
  multi_tensor_scale_(ts, scale);
  const float s = static_cast<float>(scale);
  for (size_t k = 0; k < ts.size(); ++k) {
    CAPTURE(k);
    std::vector<double> want = to_f64(before[k]);
    for (double& x : want) x = round_to(static_cast<double>(static_cast<float>(x) * s), ts[k].dtype());
    require_equal(cast(ts[k], DType::f64), f64_tensor(want, ts[k].shape()));
  }
  multi_tensor_scale_({}, 2.0);  // nothing to do
  REQUIRE_THROWS_WITH(multi_tensor_scale_({make_noncontiguous(random_tensor({4, 5}, DType::f32, 1))}, 2.0),
                      ContainsSubstring("[multi_tensor_scale] tensor 0 must be contiguous"));
  REQUIRE_THROWS_WITH(multi_tensor_scale_({zeros({3}, DType::i32)}, 2.0), ContainsSubstring("[multi_tensor_scale]"));
  Tensor needs_grad = random_tensor({3}, DType::f32, 2);
  needs_grad.set_requires_grad(true);
  REQUIRE_THROWS_WITH(multi_tensor_scale_({needs_grad}, 2.0), ContainsSubstring("NoGradGuard"));
}

TEST_CASE("clip_grad_norm_ leaves grads alone when the norm is not finite", "[optim]") {
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    nn::NamedTensors ps = make_params(DType::f32, 70);
    set_grads(ps, 1, 71, false);
    ps[3].second.grad().data_ptr<float>()[1] = bad;
    std::vector<std::vector<double>> before;
    for (const auto& [n, p] : ps) before.push_back(to_f64(p.grad()));
    const double norm = nn::clip_grad_norm_(ps, 1e-3);
    REQUIRE(!std::isfinite(norm));
    REQUIRE(std::isnan(norm) == std::isnan(bad));
    for (size_t k = 0; k < ps.size(); ++k) {
      const std::vector<double> now = to_f64(ps[k].second.grad());
      for (size_t i = 0; i < now.size(); ++i) {
        if (std::isnan(before[k][i])) REQUIRE(std::isnan(now[i]));
        else REQUIRE(now[i] == before[k][i]);
      }
    }
  }
}

TEST_CASE("clip_grad_norm_ handles f64 and non-contiguous grads", "[optim]") {
  Tensor a = random_tensor({50, 3}, DType::f64, 80), b = random_tensor({40}, DType::bf16, 81);
  a.set_requires_grad(true);
  b.set_requires_grad(true);
  Tensor ga = make_noncontiguous(random_tensor({50, 3}, DType::f64, 82)), gb = random_tensor({40}, DType::bf16, 83);
  a.set_grad(ga);
  b.set_grad(gb);
  double sq = 0.0;
  for (const Tensor& g : {ga, gb})
    for (double x : to_f64(g)) sq += x * x;
  const std::vector<double> wa = to_f64(ga), wb = to_f64(gb);
  const double norm = nn::clip_grad_norm_(std::vector<Tensor>{a, b}, 1.0);
  REQUIRE(norm == Catch::Approx(std::sqrt(sq)).epsilon(1e-5));
  const double coef = 1.0 / (norm + 1e-6);
  std::vector<double> ra = wa, rb = wb;
  for (double& x : ra) x = static_cast<float>(x) * static_cast<float>(coef);
  for (double& x : rb) x = round_to(static_cast<float>(x) * static_cast<float>(coef), DType::bf16);
  require_close(a.grad(), f64_tensor(ra, {50, 3}), 1e-6, 1e-9);
  require_equal(cast(b.grad(), DType::f64), f64_tensor(rb, {40}));
}

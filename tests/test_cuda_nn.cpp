// CUDA kernels of the fused nn ops against the CPU reference: embedding, rms_norm, rotary_embedding,
// cross_entropy (checked and unchecked) and swiglu, forward and backward (autograd gradients on both
// devices), in every float dtype, odd sizes, non-contiguous inputs, ignored rows, and the index errors
// the CPU raises.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <functional>

#include "autograd/engine.h"
#include "core/cuda/runtime.h"
#include "core/ops/indexing.h"
#include "core/ops/loss.h"
#include "core/ops/norm.h"
#include "core/dispatch.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

const Device kGPU{DeviceType::cuda, 0};
const DType kFloats[] = {DType::f64, DType::f32, DType::bf16, DType::f16};

struct Tol {
  double rtol, atol;
};
// Both backends compute in f32 (f64) and round once; reductions differ in order.
Tol tol_for(DType d) {
  switch (d) {
    case DType::f64: return {1e-10, 1e-12};
    case DType::f32: return {1e-5, 1e-5};
    case DType::bf16: return {1e-2, 1e-2};
    default: return {2e-3, 2e-3};
  }
}

void check_close(const Tensor& got, const Tensor& want, DType d, double scale = 1.0) {
  REQUIRE(got.device() == kGPU);
  REQUIRE(got.shape() == want.shape());
  REQUIRE(got.dtype() == want.dtype());
  const Tol t = tol_for(d);
  test::require_close(got.to(kCPU), want, t.rtol * scale, t.atol * scale);
}

Tensor gpu(const Tensor& t, bool noncontiguous = false) {
  Tensor g = t.to(kGPU);
  return noncontiguous && t.dim() > 0 ? test::make_noncontiguous(g) : g;
}

Tensor random_ids(const Shape& shape, int64_t high, DType dtype, uint64_t seed) {
  Generator gen(seed);
  autograd::NoGradGuard no_grad;
  Tensor ids = randint(0, high, shape, DType::i64, kCPU, &gen);
  return dtype == DType::i64 ? ids : cast(ids, dtype);
}

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

// Gradients of f at the inputs with cotangent r, on the CPU and on CUDA copies (made
// non-contiguous on request); compared input by input.
void compare_grads(const Fn& f, const std::vector<Tensor>& cpu, const Tensor& r, bool nc, DType d, double scale = 1.0) {
  std::vector<Tensor> a, b;
  for (const Tensor& t : cpu) {
    a.push_back(t.detach().set_requires_grad());
    b.push_back(gpu(t, nc).detach().set_requires_grad());
  }
  std::vector<Tensor> want = autograd::grad({f(a)}, a, {r});
  std::vector<Tensor> got = autograd::grad({f(b)}, b, {gpu(r)});
  for (size_t i = 0; i < want.size(); ++i) {
    INFO("gradient of input " << i);
    check_close(got[i], want[i], d, scale);
  }
}

}  // namespace

// ---------------------------------------------------------------- embedding

TEST_CASE("cuda embedding matches the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    for (DType it : {DType::i64, DType::i32}) {
      for (int64_t d : {int64_t{5}, int64_t{64}, int64_t{136}}) {
        for (bool nc : {false, true}) {
          INFO(dtype_name(dt) << " ids " << dtype_name(it) << " D " << d << " nc " << nc);
          const int64_t v = 37;
          Tensor w = test::random_tensor({v, d}, dt, 1);
          Tensor ids = random_ids({6, 7}, v, it, 2);
          Tensor got = embedding(gpu(w, nc), gpu(ids, nc));
          REQUIRE(got.shape() == Shape{6, 7, d});
          test::require_equal(got.to(kCPU), embedding(w, ids));
        }
      }
    }
  }
}

TEST_CASE("cuda embedding backward matches the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    for (int64_t d : {int64_t{3}, int64_t{64}, int64_t{1000}}) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " D " << d << " nc " << nc);
        const int64_t v = 300;
        // ids with many repeats of a few rows (one id fills a third of the positions)
        Tensor ids = random_ids({9, 41}, 20, DType::i64, 3);
        ids = where(lt(random_ids({9, 41}, 3, DType::i64, 4), 1.0), full({}, 7.0, DType::i64), ids);
        Tensor g = test::random_tensor({9, 41, d}, dt, 5);
        Tensor want = dispatch1(std::make_shared<const prim::EmbeddingBackward>(v), {g, ids});
        Tensor got = dispatch1(std::make_shared<const prim::EmbeddingBackward>(v), {gpu(g, nc), gpu(ids, nc)});
        check_close(got, want, dt, 4.0);  // sums of up to ~130 rounded rows
        // deterministic: a second run gives the same bits
        Tensor again = dispatch1(std::make_shared<const prim::EmbeddingBackward>(v), {gpu(g, nc), gpu(ids, nc)});
        test::require_equal(again.to(kCPU), got.to(kCPU));
      }
    }
  }
  // through autograd, i32 ids
  Tensor w = test::random_tensor({50, 24}, DType::f32, 6);
  Tensor ids = random_ids({4, 33}, 50, DType::i32, 7);
  compare_grads([&](const std::vector<Tensor>& in) { return embedding(in[0], in[0].device() == kGPU ? gpu(ids) : ids); },
                {w}, test::random_tensor({4, 33, 24}, DType::f32, 8), false, DType::f32);
}

TEST_CASE("cuda embedding rejects ids out of range", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  Tensor w = zeros({7, 3}, DType::f32, kGPU);
  REQUIRE_THROWS_WITH(embedding(w, from_vector<int64_t>({1, 7, 9}, {3}, kGPU)),
                      ContainsSubstring("[embedding]") && ContainsSubstring("id 7") &&
                          ContainsSubstring("position 1") && ContainsSubstring("V = 7"));
  REQUIRE_THROWS_WITH(embedding(w, from_vector<int32_t>({-1}, {1}, kGPU)),
                      ContainsSubstring("[embedding]") && ContainsSubstring("id -1"));
  REQUIRE_THROWS_WITH(dispatch1(std::make_shared<const prim::EmbeddingBackward>(7),
                                {zeros({2, 3}, DType::f32, kGPU), from_vector<int64_t>({0, 8}, {2}, kGPU)}),
                      ContainsSubstring("[embedding_backward]") && ContainsSubstring("id 8"));
  // the device stays usable
  test::require_equal(embedding(w, from_vector<int64_t>({6}, {1}, kGPU)).to(kCPU), zeros({1, 3}));
}

// ---------------------------------------------------------------- rms_norm

TEST_CASE("cuda rms_norm forward and backward match the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  // odd D, D = 1, Llama's 4096, a long row beyond the register-held part, many rows (several per
  // block in the backward pass)
  const Shape shapes[] = {{3, 5, 7}, {1, 13}, {4, 1}, {6}, {2, 64}, {5, 4096}, {3, 4095}, {2, 20000}, {3000, 24}};
  for (DType dt : kFloats) {
    for (const Shape& s : shapes) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(s) << " nc " << nc);
        Tensor x = test::random_tensor(s, dt, 10);
        Tensor w = test::random_tensor({s.back()}, dt, 11);
        check_close(rms_norm(gpu(x, nc), gpu(w, nc), 1e-5), rms_norm(x, w, 1e-5), dt);
        const double rows = static_cast<double>(x.numel() / s.back());
        // dw sums every row: its error grows with the row count
        compare_grads([](const std::vector<Tensor>& in) { return rms_norm(in[0], in[1], 1e-5); }, {x, w},
                      test::random_tensor(s, dt, 12), nc, dt, std::max(1.0, std::sqrt(rows)));
      }
    }
  }
}

TEST_CASE("cuda rms_norm backward adds a gathered gradient in its kernel as the CPU does", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  // the staged kernel (Llama's 4096), the register-held one (4095: not in packs), a long row, one
  // element per row; a contiguous addend, and a broadcast one (made contiguous for the kernel)
  const Shape shapes[] = {{5, 4096}, {3, 4095}, {2, 20000}, {3000, 24}, {4, 1}};
  for (DType dt : kFloats) {
    for (const Shape& s : shapes) {
      for (bool broadcast : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(s) << " broadcast addend " << broadcast);
        const Tensor x = test::random_tensor(s, dt, 60), w = test::random_tensor({s.back()}, dt, 61);
        const Tensor g = test::random_tensor(s, dt, 62);
        const Tensor a = broadcast ? expand(test::random_tensor({1, s.back()}, dt, 63), s) : test::random_tensor(s, dt, 63);
        auto op = std::make_shared<const prim::RmsNormBackward>(1e-5);
        const std::vector<Tensor> want = dispatch(op, {x, w, g, a});
        const std::vector<Tensor> got = dispatch(op, {gpu(x), gpu(w), gpu(g), broadcast ? expand(gpu(a.narrow(0, 0, 1)), s) : gpu(a)});
        check_close(got[0], want[0], dt);
        check_close(got[1], want[1], dt, std::max(1.0, std::sqrt(static_cast<double>(s[0]))));
      }
    }
  }
}

// ---------------------------------------------------------------- rotary_embedding

namespace {

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
  return {cast(from_vector<double>(c, {t, d / 2}), dtype), cast(from_vector<double>(s, {t, d / 2}), dtype)};
}

}  // namespace

TEST_CASE("cuda rotary_embedding forward and backward match the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    for (DType table : {dt, DType::f32}) {
      for (int64_t d : {2, 14, 64, 128}) {
        INFO(dtype_name(dt) << " tables " << dtype_name(table) << " D " << d);
        const int64_t b = 2, h = 3, t = 5;
        const auto [cos, sin] = rope_tables(t, d, table);
        const Tensor c = cos, s = sin;
        Tensor xs[] = {test::random_tensor({b, h, t, d}, dt, 20),
                       permute(test::random_tensor({b, t, h, d}, dt, 21), {0, 2, 1, 3})};
        for (const Tensor& x : xs) {
          Tensor gx = permute(gpu(permute(x, {0, 2, 1, 3}).contiguous()), {0, 2, 1, 3});  // same layout on the GPU
          if (x.is_contiguous()) gx = gpu(x);
          check_close(rotary_embedding(gx, gpu(c), gpu(s)), rotary_embedding(x, c, s), dt);
          compare_grads(
              [&](const std::vector<Tensor>& in) {
                const bool on_gpu = in[0].device() == kGPU;
                return rotary_embedding(in[0], on_gpu ? gpu(c) : c, on_gpu ? gpu(s) : s);
              },
              {x}, test::random_tensor(x.shape(), dt, 22), false, dt);
        }
      }
    }
  }
  // per-sequence tables (B, 1, T, D/2) broadcast over heads, non-contiguous tables and x
  auto [c0, s0] = rope_tables(4, 6, DType::f32);
  auto [c1, s1] = rope_tables(6, 6, DType::f32);
  Tensor cos = stack({c0, narrow(c1, 0, 2, 4)}, 0).unsqueeze(1);  // (2, 1, 4, 3)
  Tensor sin = stack({s0, narrow(s1, 0, 2, 4)}, 0).unsqueeze(1);
  Tensor x = test::random_tensor({2, 3, 4, 6}, DType::f32, 23);
  check_close(rotary_embedding(gpu(x, true), gpu(cos, true), gpu(sin, true)), rotary_embedding(x, cos, sin), DType::f32);
}

// ---------------------------------------------------------------- cross_entropy

namespace {

const Reduction kReductions[] = {Reduction::none, Reduction::sum, Reduction::mean};

// Targets in [0, V) with rows 1 and n-2 set to ignore_index.
Tensor ce_targets(int64_t n, int64_t v, int64_t ignore, DType dtype, uint64_t seed) {
  std::vector<int64_t> t = random_ids({n}, v, DType::i64, seed).to_vector<int64_t>();
  t[1] = ignore;
  t[static_cast<size_t>(n - 2)] = ignore;
  Tensor out = from_vector<int64_t>(t, {n});
  return dtype == DType::i64 ? out : cast(out, dtype);
}

}  // namespace

TEST_CASE("cuda cross_entropy forward and backward match the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  struct Size {
    int64_t n, v;
  };
  const Size sizes[] = {{6, 11}, {5, 1}, {40, 1000}, {9, 4099}, {4, 128256}};
  for (DType dt : kFloats) {
    for (const Size& sz : sizes) {
      for (Reduction red : kReductions) {
        for (bool nc : {false, true}) {
          if (nc && sz.v > 5000) continue;  // the strided path on small rows is enough
          INFO(dtype_name(dt) << " (" << sz.n << ", " << sz.v << ") " << prim::reduction_name(red) << " nc " << nc);
          const int64_t ignore = nc ? 3 : -100;
          Tensor logits = mul(test::random_tensor({sz.n, sz.v}, dt, 30), 3.0);
          Tensor targets = ce_targets(sz.n, std::max<int64_t>(sz.v, 1), ignore, nc ? DType::i32 : DType::i64, 31);
          const Tensor tg = gpu(targets, nc);
          // the CPU adds a row's exps one by one in f32: its error grows with V
          const double scale = std::max(1.0, std::sqrt(static_cast<double>(sz.v)) / 16.0);
          check_close(cross_entropy(gpu(logits, nc), tg, ignore, red), cross_entropy(logits, targets, ignore, red), dt,
                      scale);
          Tensor r = red == Reduction::none ? test::random_tensor({sz.n}, dt, 32) : full({}, 1.7, dt);
          compare_grads(
              [&](const std::vector<Tensor>& in) {
                return cross_entropy(in[0], in[0].device() == kGPU ? tg : targets, ignore, red);
              },
              {logits}, r, nc, dt, scale);
        }
      }
    }
  }
}

TEST_CASE("cuda cross_entropy with every row ignored is 0", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  Tensor logits = test::random_tensor({3, 4}, DType::f32, 33).to(kGPU).set_requires_grad();
  Tensor targets = from_vector<int64_t>({-100, -100, -100}, {3}, kGPU);
  for (Reduction red : kReductions) {
    INFO(prim::reduction_name(red));
    Tensor zero = red == Reduction::none ? zeros({3}) : zeros({});
    Tensor loss = cross_entropy(logits, targets, -100, red);
    test::require_equal(loss.to(kCPU), zero);
    test::require_equal(autograd::grad({loss}, {logits}, {ones_like(loss)})[0].to(kCPU), zeros({3, 4}));
  }
  // empty batches
  test::require_equal(cross_entropy(zeros({0, 5}, DType::f32, kGPU), zeros({0}, DType::i64, kGPU)).to(kCPU), zeros({}));
}

TEST_CASE("cuda cross_entropy rejects targets out of range", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  Tensor logits = test::random_tensor({4, 5}, DType::f32, 34).to(kGPU);
  REQUIRE_THROWS_WITH(cross_entropy(logits, from_vector<int64_t>({0, 1, 5, 2}, {4}, kGPU)),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("target 5 at row 2"));
  REQUIRE_THROWS_WITH(cross_entropy(logits, from_vector<int32_t>({0, -1, 7, 2}, {4}, kGPU)),
                      ContainsSubstring("[cross_entropy]") && ContainsSubstring("target -1 at row 1"));
  REQUIRE_THROWS_WITH(dispatch1(std::make_shared<const prim::CrossEntropyBackward>(-100, Reduction::mean),
                                {logits, from_vector<int64_t>({0, 1, 2, 9}, {4}, kGPU), ones({}, DType::f32, kGPU)}),
                      ContainsSubstring("[cross_entropy_backward]") && ContainsSubstring("target 9 at row 3"));
}

TEST_CASE("cuda cross_entropy_unchecked matches cross_entropy and skips the device check", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : {DType::f32, DType::bf16}) {
    for (Reduction red : kReductions) {
      INFO(dtype_name(dt) << " " << prim::reduction_name(red));
      Tensor logits = mul(test::random_tensor({37, 4099}, dt, 35), 3.0).to(kGPU).set_requires_grad();
      const Tensor targets = ce_targets(37, 4099, -100, DType::i64, 36).to(kGPU);
      Tensor g = (red == Reduction::none ? test::random_tensor({37}, dt, 37) : full({}, 1.3, dt)).to(kGPU);
      Tensor a = cross_entropy(logits, targets, -100, red), b = cross_entropy_unchecked(logits, targets, -100, red);
      test::require_equal(b.to(kCPU), a.to(kCPU));  // the same kernel, without the check
      test::require_equal(autograd::grad({b}, {logits}, {g})[0].to(kCPU),
                          autograd::grad({a}, {logits}, {g})[0].to(kCPU));
    }
  }
  // An invalid target is not reported (the caller promised valid ones) and reads nothing out of
  // bounds (compute-sanitizer memcheck runs this); the valid rows keep their losses.
  Tensor logits = test::random_tensor({4, 5}, DType::f32, 38).to(kGPU).set_requires_grad();
  const Tensor bad = from_vector<int64_t>({0, 1, 500, -7}, {4}, kGPU);
  Tensor loss = cross_entropy_unchecked(logits, bad, -100, Reduction::none);
  Tensor dl = autograd::grad({loss}, {logits}, {ones_like(loss)})[0];
  const Tensor ok = cross_entropy(logits, from_vector<int64_t>({0, 1, -100, -100}, {4}, kGPU), -100, Reduction::none);
  test::require_equal(narrow(loss, 0, 0, 2).to(kCPU), narrow(ok, 0, 0, 2).to(kCPU));
  REQUIRE(dl.to(kCPU).shape() == Shape{4, 5});
}

// ---------------------------------------------------------------- swiglu

TEST_CASE("cuda swiglu forward and backward match the CPU", "[cuda][nn_ops]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Shape shapes[] = {{}, {7}, {3, 5, 7}, {2, 64}, {257, 1031}};
  for (DType dt : kFloats) {
    for (const Shape& s : shapes) {
      for (bool nc : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(s) << " nc " << nc);
        Tensor gate = mul(test::random_tensor(s, dt, 40), 4.0), up = test::random_tensor(s, dt, 41);
        check_close(swiglu(gpu(gate, nc), gpu(up, nc)), swiglu(gate, up), dt);
        compare_grads([](const std::vector<Tensor>& in) { return swiglu(in[0], in[1]); }, {gate, up},
                      test::random_tensor(s, dt, 42), nc, dt);
      }
    }
  }
  // one operand contiguous, the other a view
  Tensor gate = test::random_tensor({33, 17}, DType::bf16, 43), up = test::random_tensor({17, 33}, DType::bf16, 44);
  check_close(swiglu(gpu(gate), transpose(gpu(up), 0, 1)), swiglu(gate, transpose(up, 0, 1)), DType::bf16);
}

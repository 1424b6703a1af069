// cuBLASLt matmul against the CPU GEMM: odd, batched, broadcast and Llama-sized shapes in every
// float dtype, transposed views (passed without copies) and other strided operands, autograd
// gradients on both devices, operands on two devices, and the TF32 switch.
#include <catch2/catch_test_macros.hpp>
#include <atomic>
#include <thread>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>

#include "autograd/engine.h"
#include "core/cuda/matmul.h"
#include "core/cuda/runtime.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

const Device kGPU{DeviceType::cuda, 0};
const DType kFloats[] = {DType::f64, DType::f32, DType::bf16, DType::f16};

struct Tol {
  double rtol, atol;
};
// Both backends accumulate in f32 (f64 for f64) and round once; they differ in summation order,
// which for half types can move a result across a rounding boundary. Scaled by sqrt(K).
Tol tol_for(DType d, int64_t k) {
  const double s = std::sqrt(static_cast<double>(std::max<int64_t>(k, 1)));
  switch (d) {
    case DType::f64: return {1e-10, 1e-12 * s};
    case DType::f32: return {1e-4, 1e-5 * s};
    case DType::bf16: return {1e-2, 1e-2 * s};
    default: return {2e-3, 2e-3 * s};
  }
}

// matmul on CPU and on CUDA copies of the same operands (each CUDA operand laid out by `layout`).
using Layout = std::function<Tensor(const Tensor&)>;
Tensor same(const Tensor& t) { return t; }

void compare(const Tensor& a, const Tensor& b, const Layout& la = same, const Layout& lb = same) {
  const Tensor ga = la(a.to(kGPU)), gb = lb(b.to(kGPU));
  REQUIRE(ga.shape() == a.shape());
  REQUIRE(gb.shape() == b.shape());
  Tensor want = matmul(a, b);
  Tensor got = matmul(ga, gb);
  REQUIRE(got.device() == kGPU);
  REQUIRE(got.shape() == want.shape());
  REQUIRE(got.dtype() == want.dtype());
  const Tol t = tol_for(a.dtype(), a.size(-1));
  test::require_close(got.to(kCPU), want, t.rtol, t.atol);
}

// The transpose of a contiguous (.., C, R) tensor: same values as x, column-major last two dims.
Tensor transposed_view(const Tensor& x) { return contiguous(transpose(x, -2, -1)).transpose(-2, -1); }

struct Case {
  Shape a, b;
};

}  // namespace

TEST_CASE("cuda matmul matches the CPU on odd, batched and broadcast shapes", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {
      {{1, 1}, {1, 1}},       {{7, 13}, {13, 5}},         {{1, 9}, {9, 1}},          {{64, 64}, {64, 64}},
      {{33, 17}, {17, 65}},   {{3, 5, 7}, {7, 2}},        {{2, 3, 4, 5}, {5, 6}},    {{4, 1, 5, 6}, {3, 6, 2}},
      {{1, 5, 6}, {4, 6, 3}}, {{2, 3, 5, 6}, {2, 3, 6, 7}}, {{6, 1, 9}, {6, 9, 4}},  {{5, 7}, {3, 7, 2}},
      {{3, 0, 4}, {4, 5}},    {{3, 4}, {4, 0}},           {{2, 3, 1, 8}, {8, 1}},
  };
  for (DType dt : kFloats) {
    for (const Case& c : cases) {
      INFO(dtype_name(dt) << " " << shape_str(c.a) << " @ " << shape_str(c.b));
      compare(test::random_tensor(c.a, dt, 1), test::random_tensor(c.b, dt, 2));
    }
  }
}

TEST_CASE("cuda matmul with K = 0 gives zeros", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    Tensor got = matmul(zeros({2, 3, 0}, dt, kGPU), zeros({0, 4}, dt, kGPU));
    REQUIRE(got.shape() == Shape{2, 3, 4});
    test::require_equal(got.to(kCPU), zeros({2, 3, 4}, dt));
  }
}

TEST_CASE("cuda matmul takes transposed and strided views", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Layout layouts[] = {same, transposed_view, [](const Tensor& t) { return test::make_noncontiguous(t); },
                            [](const Tensor& t) {  // rows with padding: a slice of a wider matrix
                              Shape wide = t.shape();
                              wide.back() += 3;
                              Tensor base = zeros(wide, t.dtype(), t.device());
                              Tensor v = narrow(base, -1, 1, t.size(-1));
                              v.copy_(t);
                              return v;
                            }};
  const Case cases[] = {{{17, 33}, {33, 9}}, {{3, 12, 20}, {20, 8}}, {{2, 3, 5, 6}, {2, 3, 6, 7}}, {{4, 1, 5, 6}, {3, 6, 2}}};
  for (DType dt : kFloats) {
    for (const Case& c : cases) {
      for (size_t i = 0; i < std::size(layouts); ++i) {
        for (size_t j = 0; j < std::size(layouts); ++j) {
          INFO(dtype_name(dt) << " " << shape_str(c.a) << " @ " << shape_str(c.b) << " layouts " << i << ", " << j);
          compare(test::random_tensor(c.a, dt, 3), test::random_tensor(c.b, dt, 4), layouts[i], layouts[j]);
        }
      }
    }
  }
  // x @ W^T with W (N, K): the nn::Linear pattern, batched activations
  for (DType dt : kFloats) {
    INFO(dtype_name(dt));
    Tensor x = test::random_tensor({2, 7, 24}, dt, 5), w = test::random_tensor({40, 24}, dt, 6);
    Tensor want = matmul(x, transpose(w, 0, 1));
    Tensor got = matmul(x.to(kGPU), transpose(w.to(kGPU), 0, 1));
    const Tol t = tol_for(dt, 24);
    test::require_close(got.to(kCPU), want, t.rtol, t.atol);
  }
}

TEST_CASE("cuda matmul on Llama-sized operands", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  // (512, 4096) @ (1024, 4096)^T: the k/v projection of Llama 3.1 8B on 512 tokens
  for (DType dt : {DType::bf16, DType::f32}) {
    INFO(dtype_name(dt));
    Tensor x = test::random_tensor({512, 4096}, dt, 7), w = test::random_tensor({1024, 4096}, dt, 8);
    Tensor want = matmul(x, transpose(w, 0, 1));
    Tensor got = matmul(x.to(kGPU), transpose(w.to(kGPU), 0, 1));
    const Tol t = tol_for(dt, 4096);
    test::require_close(got.to(kCPU), want, t.rtol, t.atol);
  }
  // odd sizes, batched
  Tensor a = test::random_tensor({3, 129, 1000}, DType::bf16, 9), b = test::random_tensor({1000, 257}, DType::bf16, 10);
  compare(a, b);
  compare(a, b, same, transposed_view);
}

TEST_CASE("cuda matmul gradients match the CPU", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {{{7, 13}, {13, 5}}, {{3, 5, 7}, {7, 2}}, {{4, 1, 5, 6}, {3, 6, 2}}, {{2, 3, 5, 6}, {2, 3, 6, 7}}};
  for (DType dt : kFloats) {
    for (const Case& c : cases) {
      for (bool transposed : {false, true}) {
        INFO(dtype_name(dt) << " " << shape_str(c.a) << " @ " << shape_str(c.b) << " transposed b " << transposed);
        Tensor a = test::random_tensor(c.a, dt, 11), b = test::random_tensor(c.b, dt, 12);
        Tensor ga = a.to(kGPU).detach().set_requires_grad();
        Tensor gb = (transposed ? transposed_view(b.to(kGPU)) : b.to(kGPU)).detach().set_requires_grad();
        a.set_requires_grad();
        b.set_requires_grad();
        Tensor y = matmul(a, b);
        Tensor r = test::random_tensor(y.shape(), dt, 13);
        std::vector<Tensor> want = autograd::grad({y}, {a, b}, {r});
        std::vector<Tensor> got = autograd::grad({matmul(ga, gb)}, {ga, gb}, {r.to(kGPU)});
        const Tol ta = tol_for(dt, c.b.back() * 4), tb = tol_for(dt, y.numel() / c.b.back() * 4);
        test::require_close(got[0].to(kCPU), want[0], ta.rtol, ta.atol);
        test::require_close(got[1].to(kCPU), want[1], tb.rtol, tb.atol);
      }
    }
  }
}

TEST_CASE("cuda matmul rejects operands on two devices", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  Tensor x = zeros({3, 4}, DType::f32, kGPU), w = zeros({4, 5}, DType::f32, kGPU);
  REQUIRE_THROWS_WITH(matmul(x, w.to(kCPU)), ContainsSubstring("[matmul]"));
}

TEST_CASE("cuda matmul in f32 with TF32 allowed stays close", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  REQUIRE_FALSE(cuda::allow_tf32());
  Tensor a = test::random_tensor({64, 256}, DType::f32, 20), b = test::random_tensor({256, 48}, DType::f32, 21);
  Tensor want = matmul(a, b);
  cuda::set_allow_tf32(true);
  Tensor got = matmul(a.to(kGPU), b.to(kGPU)).to(kCPU);
  cuda::set_allow_tf32(false);
  test::require_close(got, want, 1e-2, 1e-2 * 16);  // TF32 keeps 10 mantissa bits
  test::require_close(matmul(a.to(kGPU), b.to(kGPU)).to(kCPU), want, 1e-4, 1e-5 * 16);
}

TEST_CASE("cuda matmul_add adds C in cuBLASLt's epilogue and scales by alpha as the CPU does", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {{{7, 13}, {13, 5}}, {{3, 5, 7}, {7, 2}}, {{4, 1, 5, 6}, {3, 6, 2}}, {{64, 4096}, {4096, 48}},
                        {{3, 0}, {0, 4}}};
  for (DType dt : kFloats) {
    for (const Case& c : cases) {
      INFO(dtype_name(dt) << " " << shape_str(c.a) << " @ " << shape_str(c.b));
      const Tensor a = test::random_tensor(c.a, dt, 1), b = test::random_tensor(c.b, dt, 2);
      const Tensor cc = test::random_tensor(matmul(a, b).shape(), dt, 3);
      const Tensor want = matmul_add(a, b, cc);
      const Tensor got = matmul_add(a.to(kGPU), b.to(kGPU), cc.to(kGPU));
      const Tol t = tol_for(dt, a.size(-1));
      test::require_close(got.to(kCPU), want, t.rtol, t.atol);
      // alpha (cuBLASLt's) scales the product only
      test::require_close(matmul_add(a.to(kGPU), b.to(kGPU), cc.to(kGPU), 0.375).to(kCPU), matmul_add(a, b, cc, 0.375),
                          t.rtol, t.atol);
      test::require_close(matmul(a.to(kGPU), b.to(kGPU), -2.5).to(kCPU), matmul(a, b, -2.5), t.rtol, 2.5 * t.atol);
    }
  }
}

TEST_CASE("cuda matmul: tuned GEMMs give the products, in place too", "[cuda][matmul]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const bool was = cuda::gemm_tuning();
  cuda::set_gemm_tuning(true);
  // Shapes no other case uses, so their plans are made (and tuned) here: plain, with an addend, and
  // out += a @ b (tuning skips that call: running it several times would add the product several times;
  // the next call of the shape, with a fresh output, tunes it).
  for (DType dt : {DType::bf16, DType::f32}) {
    INFO(dtype_name(dt));
    const Tensor a = test::random_tensor({333, 260}, dt, 40), b = test::random_tensor({260, 198}, dt, 41);
    const Tensor c = test::random_tensor({333, 198}, dt, 42);
    const Tol t = tol_for(dt, 260);
    Tensor acc = c.to(kGPU);
    matmul_into(acc, a.to(kGPU), b.to(kGPU), /*accumulate=*/true);
    test::require_close(acc.to(kCPU), matmul_add(a, b, c), t.rtol, t.atol);
    test::require_close(matmul(a.to(kGPU), b.to(kGPU)).to(kCPU), matmul(a, b), t.rtol, t.atol);
    test::require_close(matmul_add(a.to(kGPU), b.to(kGPU), c.to(kGPU)).to(kCPU), matmul_add(a, b, c), t.rtol, t.atol);
    matmul_into(acc, a.to(kGPU), b.to(kGPU), /*accumulate=*/true);  // tuned now: adds once more
    test::require_close(acc.to(kCPU), add(matmul_add(a, b, c), matmul(a, b)), 2 * t.rtol, 2 * t.atol);
  }
  cuda::set_gemm_tuning(was);
}

TEST_CASE("cuda matmul: host threads sharing one stream get their own products", "[cuda][matmul]") {
  // The local backend's ranks are threads on the default stream. A cuBLASLt call may enqueue several
  // kernels that pass partial sums through the stream's workspace (split-K); another thread's GEMM
  // enqueued between them overwrote those (fully_shard on one GPU lost 1e-3 of its loss).
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {{{48, 48}, {48, 90}}, {{48, 90}, {90, 48}}, {{64, 8192}, {8192, 64}}, {{16, 16384}, {16384, 32}}};
  std::vector<std::pair<Tensor, Tensor>> operands;
  std::vector<Tensor> want;  // one thread's products
  for (size_t i = 0; i < std::size(cases); ++i) {
    operands.emplace_back(test::random_tensor(cases[i].a, DType::f32, 10 + i).to(kGPU),
                          test::random_tensor(cases[i].b, DType::f32, 20 + i).to(kGPU));
    want.push_back(matmul(operands.back().first, operands.back().second).to(kCPU));
  }
  std::atomic<int> wrong{0};
  auto work = [&] {
    for (int round = 0; round < 50; ++round)
      for (size_t i = 0; i < operands.size(); ++i)
        if (!test::all_close(matmul(operands[i].first, operands[i].second).to(kCPU), want[i], 0.0, 0.0)) ++wrong;
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(work);
  for (std::thread& t : threads) t.join();
  REQUIRE(wrong.load() == 0);
}

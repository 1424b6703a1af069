// CUDA reductions against the CPU reference: sum/mean/amax/amin/argmax/logsumexp/softmax/log_softmax
// over dim subsets (0-d, size-1, odd, non-contiguous, expanded) in every dtype they take; the row,
// column and split kernels (long rows, (7, 128256) softmax); -inf/NaN rules; determinism; gradients.
#include <catch2/catch_test_macros.hpp>
#include <cmath>
#include <functional>
#include <limits>

#include "autograd/engine.h"
#include "core/cuda/runtime.h"
#include "tests/helpers.h"

using namespace kiln;

namespace {

const Device kGPU{DeviceType::cuda, 0};
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

using Fn = std::function<Tensor(const Tensor&)>;

// Tolerance for a result that sums `n` terms (f32 accumulation on the GPU, f64 on the CPU).
struct Tol {
  double rtol, atol;
};
Tol tol_for(DType d, int64_t n = 1) {
  const double grow = std::sqrt(static_cast<double>(std::max<int64_t>(n, 1)));
  switch (d) {
    case DType::f64: return {1e-11, 1e-11 * grow};
    case DType::f32: return {1e-5, 2e-6 * grow};
    case DType::bf16: return {1e-2, 1e-3 * grow};
    case DType::f16: return {2e-3, 1e-4 * grow};
    default: return {0.0, 0.0};
  }
}

// f on x (CPU) and on a CUDA copy of x, non-contiguous on request.
void compare(const Fn& f, const Tensor& x, bool noncontiguous, Tol tol) {
  Tensor g = x.to(kGPU);
  if (noncontiguous && x.dim() > 0) g = test::make_noncontiguous(g);
  Tensor want = f(x);
  Tensor got = f(g);
  REQUIRE(got.device() == kGPU);
  if (is_floating(want.dtype())) {
    test::require_close(got.to(kCPU), want, tol.rtol, tol.atol);
  } else {
    test::require_equal(got.to(kCPU), want);
  }
}

struct DimsCase {
  Shape shape;
  std::vector<int64_t> dims;
};
const DimsCase kDimsCases[] = {
    {{}, {}},           {{1}, {}},           {{7}, {0}},          {{3, 1, 7}, {1}},     {{3, 1, 7}, {-1}},
    {{3, 1, 7}, {0, -1}}, {{2, 5, 3, 4}, {0, 2}}, {{2, 5, 3, 4}, {-3, -1}}, {{2, 5, 3, 4}, {3}}, {{2, 5, 3, 4}, {0}},
    {{2, 5, 3, 4}, {}}, {{4, 9}, {0}},       {{33, 1001}, {1}},   {{1001, 33}, {0}},    {{64, 3, 129}, {0, 2}},
    {{5, 0, 3}, {1}},   {{6, 16}, {0}},      {{5, 3, 8}, {1}},    {{40, 3, 64}, {0, 1}},
};

const DType kFloat[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
const DType kAll[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean};

int64_t reduced_count(const Shape& s, const std::vector<int64_t>& dims) {
  if (dims.empty()) return numel(s);
  int64_t n = 1;
  for (int64_t d : dims) n *= s[static_cast<size_t>(d < 0 ? d + static_cast<int64_t>(s.size()) : d)];
  return n;
}

}  // namespace

TEST_CASE("cuda sum/mean/amax/amin match the CPU over dim subsets", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 1;
  for (const DimsCase& c : kDimsCases) {
    for (DType d : kAll) {
      for (bool keep : {false, true}) {
        for (bool nc : {false, true}) {
          INFO(shape_str(c.shape) << " dims " << c.dims.size() << " " << dtype_name(d) << " keepdim " << keep << " nc " << nc);
          const int64_t n = reduced_count(c.shape, c.dims);
          Tensor x = test::random_tensor(c.shape, d, ++seed);
          compare([&](const Tensor& t) { return sum(t, c.dims, keep); }, x, nc, tol_for(d, n));
          if (is_floating(d)) {
            const Tol t = tol_for(d, n);
            compare([&](const Tensor& v) { return mean(v, c.dims, keep); }, x, nc, {t.rtol, t.atol / std::max<double>(1.0, static_cast<double>(n))});
          }
          if (n > 0) {
            compare([&](const Tensor& t) { return amax(t, c.dims, keep); }, x, nc, {0.0, 0.0});
            compare([&](const Tensor& t) { return amin(t, c.dims, keep); }, x, nc, {0.0, 0.0});
          }
        }
      }
    }
  }
}

TEST_CASE("cuda reductions on long rows, columns, split and expanded inputs", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  const DimsCase cases[] = {{{(1 << 22) + 7}, {}}, {{33, 100003}, {1}}, {{50001, 37}, {0}}, {{3, 40000, 5}, {1}},
                            {{7, 128256}, {1}},    {{2, 3000, 129}, {0, 1}}, {{999, 64}, {0}}, {{3, 700, 256}, {1}}};
  uint64_t seed = 900;
  for (const DimsCase& c : cases) {
    for (DType d : {DType::f32, DType::bf16, DType::i32}) {
      INFO(shape_str(c.shape) << " " << dtype_name(d));
      const int64_t n = reduced_count(c.shape, c.dims);
      Tensor x = test::random_tensor(c.shape, d, ++seed);
      compare([&](const Tensor& t) { return sum(t, c.dims); }, x, false, tol_for(d, n));
      compare([&](const Tensor& t) { return amax(t, c.dims); }, x, false, {0.0, 0.0});
      if (is_floating(d)) compare([&](const Tensor& t) { return logsumexp(t, c.dims); }, x, false, tol_for(d));
      if (c.dims.size() == 1) compare([&](const Tensor& t) { return argmax(t, c.dims[0]); }, x, false, {});
    }
  }
  SECTION("expanded (stride 0) and transposed inputs") {
    Tensor x = test::random_tensor({1, 300}, DType::f32, 77);
    Tensor e = expand(x.to(kGPU), {500, 300});
    test::require_close(sum(e, {0}).to(kCPU), sum(expand(x, {500, 300}), {0}), 1e-5, 1e-4);
    Tensor y = test::random_tensor({300, 700}, DType::f32, 78);
    test::require_close(sum(y.to(kGPU).transpose(0, 1), {1}).to(kCPU), sum(y.transpose(0, 1), {1}), 1e-5, 1e-4);
  }
}

TEST_CASE("cuda argmax matches the CPU (first maximum, NaN wins)", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 300;
  const Shape shapes[] = {{}, {7}, {3, 1, 7}, {2, 5, 3, 4}, {17, 2049}};
  for (const Shape& s : shapes) {
    for (DType d : kAll) {
      for (int64_t dim = 0; dim < std::max<int64_t>(1, static_cast<int64_t>(s.size())); ++dim) {
        for (bool nc : {false, true}) {
          INFO(shape_str(s) << " " << dtype_name(d) << " dim " << dim);
          Tensor x = test::random_tensor(s, d, ++seed);  // ints and bool have many ties
          compare([&](const Tensor& t) { return argmax(t, dim, nc); }, x, nc, {});
        }
      }
    }
  }
  const std::vector<double> v = {1.0, kNaN, 3.0, kNaN, 3.0, -kInf, kInf, 2.0, kInf};
  for (DType d : kFloat) {
    Tensor x = cast(from_vector<double>(v, {9}), d);
    compare([](const Tensor& t) { return argmax(t, 0); }, x, false, {});
    compare([](const Tensor& t) { return argmax(t.slice(0, 2, 9), 0); }, x, false, {});
  }
}

TEST_CASE("cuda logsumexp matches the CPU, including -inf/+inf/NaN rows", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 400;
  for (const DimsCase& c : kDimsCases) {
    for (DType d : kFloat) {
      for (bool nc : {false, true}) {
        INFO(shape_str(c.shape) << " " << dtype_name(d));
        Tensor x = test::random_tensor(c.shape, d, ++seed);
        compare([&](const Tensor& t) { return logsumexp(t, c.dims, nc); }, x, nc, tol_for(d));
      }
    }
  }
  const std::vector<double> v = {-kInf, -kInf, -kInf, 1.0, -kInf, 2.0, kInf, 1.0, 0.5, kNaN, 1.0, kInf, 1.0, 2.0, 3.0};
  for (DType d : kFloat) {
    Tensor x = cast(from_vector<double>(v, {5, 3}), d);
    compare([](const Tensor& t) { return logsumexp(t, {1}); }, x, false, tol_for(d));
  }
}

TEST_CASE("cuda softmax and log_softmax match the CPU along every dim", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 500;
  // (200, 20000): long rows, one block each; (7, 128256): few Llama-vocab rows, split statistics;
  // (3000, 67): many short rows.
  // (96, 128256): enough Llama-vocab rows for the cluster path that holds each row in registers.
  const Shape shapes[] = {{}, {1}, {9}, {3, 5, 7}, {4, 1, 6}, {200, 20000}, {7, 128256}, {96, 128256}, {3000, 67}};
  for (const Shape& s : shapes) {
    for (DType d : kFloat) {
      for (int64_t dim = -1; dim < static_cast<int64_t>(s.size()); ++dim) {
        if (s.empty() && dim >= 0) continue;
        for (bool nc : {false, true}) {
          if (numel(s) > 100000 && (nc || dim >= 0 || d == DType::f64)) continue;  // keep the CPU side quick
          for (bool log : {false, true}) {
            INFO(shape_str(s) << " " << dtype_name(d) << " dim " << dim << " log " << log << " nc " << nc);
            Tensor x = test::random_tensor(s, d, ++seed) * 3.0;
            compare([&](const Tensor& t) { return log ? log_softmax(t, dim) : softmax(t, dim); }, x, nc,
                    {tol_for(d).rtol, log ? tol_for(d).atol * 10 : tol_for(d).atol});
          }
        }
      }
    }
  }
  const std::vector<double> v = {-kInf, -kInf, -kInf, 1.0, -kInf, 2.0, kInf, 1.0, 0.5, kNaN, 1.0, kInf, 1.0, 2.0, 3.0};
  for (DType d : kFloat) {
    Tensor x = cast(from_vector<double>(v, {5, 3}), d);
    for (bool log : {false, true}) {
      compare([&](const Tensor& t) { return log ? log_softmax(t, 1) : softmax(t, 1); }, x, false, tol_for(d));
      compare([&](const Tensor& t) { return log ? log_softmax(t, 0) : softmax(t, 0); }, x, false, tol_for(d));
    }
  }
}

TEST_CASE("cuda reductions are deterministic", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  Tensor x = test::random_tensor({(1 << 21) + 3}, DType::f32, 600).to(kGPU);
  Tensor m = test::random_tensor({40, 30011}, DType::f32, 601).to(kGPU);
  test::require_equal(sum(x), sum(x));
  test::require_equal(sum(m, {0}), sum(m, {0}));
  test::require_equal(logsumexp(m, {1}), logsumexp(m, {1}));
  test::require_equal(softmax(m, 1), softmax(m, 1));
}

TEST_CASE("cuda reduction gradients match the CPU", "[cuda][reduce]") {
  if (!kiln::cuda::is_available()) SKIP("no CUDA device");
  auto loss = [](const Tensor& x, const Tensor& w) {
    Tensor z = x * w;  // (B, T, C) * (C)
    Tensor l = sum(log_softmax(z, -1) * softmax(x, 1)) + sum(logsumexp(z, {0, 2})) + mean(amax(z, {1})) -
               sum(amin(x, {0, 1}) * w) + sum(mean(square(x), {2}));
    return l;
  };
  for (DType d : {DType::f64, DType::f32}) {
    for (bool nc : {false, true}) {
      INFO(dtype_name(d) << (nc ? " non-contiguous" : ""));
      Tensor x = test::random_tensor({3, 5, 37}, d, 21), w = test::random_tensor({37}, d, 22);
      std::vector<Tensor> grads[2];
      for (int dev = 0; dev < 2; ++dev) {
        std::vector<Tensor> in;
        for (const Tensor& t : {x, w}) {
          Tensor v = dev == 0 ? t.detach() : t.to(kGPU);
          if (nc && dev == 1) v = test::make_noncontiguous(v);
          v = v.detach();
          v.set_requires_grad(true);
          in.push_back(v);
        }
        grads[dev] = autograd::grad({loss(in[0], in[1])}, in);
      }
      for (size_t k = 0; k < 2; ++k) {
        REQUIRE(grads[1][k].device() == kGPU);
        test::require_close(grads[1][k].to(kCPU), grads[0][k], d == DType::f64 ? 1e-10 : 1e-4, d == DType::f64 ? 1e-10 : 1e-4);
      }
    }
  }
}

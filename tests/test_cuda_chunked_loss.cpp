// chunked_linear_loss on CUDA in f32 and bf16 against the naive head on the CPU and on the GPU: loss
// and gradients (hidden, weight, bias) for every ready-made loss, several chunk sizes, ignored
// tokens; and its extra peak memory against the full logits it never materialises.
#include <catch2/catch_test_macros.hpp>
#include <cmath>
#include <random>
#include <string>

#include "autograd/engine.h"
#include "core/cuda/runtime.h"
#include "nn/chunked_loss.h"
#include "tests/helpers.h"

using namespace kiln;

namespace {

const Device kGPU{DeviceType::cuda, 0};

// Targets in [0, v); every 7th token and the block [64, 130) ignored (whole chunks of 16 among them).
Tensor ids_with_ignored(int64_t n, int64_t v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const bool ignored = i % 7 == 3 || (i >= 64 && i < 130);
    t[static_cast<size_t>(i)] = ignored ? -100 : static_cast<int64_t>(rng() % static_cast<uint64_t>(v));
  }
  return from_vector<int64_t>(t, {n});
}

Tensor naive_loss(const Tensor& hidden, const Tensor& weight, const Tensor& bias, const Tensor& targets,
                  const nn::LossFn& fn) {
  const DType ldt = hidden.dtype() == DType::f64 ? DType::f64 : DType::f32;
  Tensor logits = add(matmul(hidden, transpose(weight, 0, 1)), bias);  // (N, V)
  logits = cast(logits, ldt);
  Tensor valid = ne(targets, -100.0);
  Tensor safe = where(valid, targets, scalar_tensor(0.0, targets.dtype(), targets.device()));
  Tensor total = sum(where(valid, cast(fn(logits, safe), ldt), scalar_tensor(0.0, ldt, targets.device())));
  return div(total, sum(cast(valid, ldt)));
}

struct Result {
  Tensor loss, dh, dw, db;  // on the CPU
};

template <class Head>
Result run(const Head& head, const Tensor& hidden, const Tensor& weight, const Tensor& bias, bool trainable) {
  Tensor x = hidden.detach();
  x.set_requires_grad(true);
  Tensor w = weight.detach();
  w.set_requires_grad(trainable);
  Tensor b = bias.detach();
  b.set_requires_grad(trainable);
  Tensor loss = head(x, w, b);
  loss.backward();
  return {loss.detach().to(kCPU), x.grad().to(kCPU), trainable ? w.grad().to(kCPU) : Tensor(),
          trainable ? b.grad().to(kCPU) : Tensor()};
}

void require_same(const Result& got, const Result& want, double rtol, double atol) {
  test::require_close(cast(got.loss, DType::f32), cast(want.loss, DType::f32), rtol, atol);
  test::require_close(cast(got.dh, DType::f32), cast(want.dh, DType::f32), rtol, atol);
  REQUIRE(got.dw.defined() == want.dw.defined());
  if (want.dw.defined()) test::require_close(cast(got.dw, DType::f32), cast(want.dw, DType::f32), rtol, atol);
  if (want.db.defined()) test::require_close(cast(got.db, DType::f32), cast(want.db, DType::f32), rtol, atol);
}

Tensor brier(const Tensor& logits, const Tensor& targets) {
  Tensor onehot = eq(unsqueeze(arange(logits.size(1), DType::i64, logits.device()), 0), unsqueeze(targets, 1));
  return sum(square(sub(softmax(logits, 1), cast(onehot, logits.dtype()))), {1});  // (n)
}

}  // namespace

TEST_CASE("cuda chunked_linear_loss equals the naive head (f32 and bf16)", "[cuda][chunked_loss]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const int64_t n = 301, h = 72, v = 1001;
  const std::vector<std::pair<std::string, nn::LossFn>> losses = {
      {"cross_entropy", nn::cross_entropy_loss()},
      {"ce+smoothing+z", nn::cross_entropy_loss({.label_smoothing = 0.1, .z_loss_weight = 1e-3})},
      {"z_loss", nn::z_loss(1e-2)},
      {"focal", nn::focal_loss(2.0)},
      {"lambda_brier", brier},
  };
  Tensor targets = ids_with_ignored(n, v, 5);
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor hidden = test::random_tensor({n, h}, dt, 1);
    Tensor weight = mul(test::random_tensor({v, h}, dt, 2), 0.3);
    Tensor bias = test::random_tensor({v}, dt, 3);
    for (const auto& [name, fn] : losses) {
      for (bool trainable : {true, false}) {
        // References: the naive head in f32 on the CPU (same values), and on the GPU in dt.
        const Result cpu = run([&](const Tensor& x, const Tensor& w, const Tensor& b) {
          return naive_loss(x, w, b, targets, fn);
        }, cast(hidden, DType::f32), cast(weight, DType::f32), cast(bias, DType::f32), trainable);
        const Result gpu_naive = run([&](const Tensor& x, const Tensor& w, const Tensor& b) {
          return naive_loss(x, w, b, targets.to(kGPU), fn);
        }, hidden.to(kGPU), weight.to(kGPU), bias.to(kGPU), trainable);
        for (int64_t chunk : {int64_t{16}, int64_t{100}, int64_t{0}}) {
          CAPTURE(dtype_name(dt), name, trainable, chunk);
          const Result got = run(
              [&](const Tensor& x, const Tensor& w, const Tensor& b) {
                nn::ChunkedLossOptions o;
                o.bias = b;
                o.chunk_size = chunk;
                o.memory_budget_bytes = size_t{32} * v * 16;  // automatic: chunks of 25-32, groups of 125-256
                Tensor loss = nn::chunked_linear_loss(x, w, targets.to(kGPU), fn, o);
                REQUIRE(loss.device() == kGPU);
                return loss;
              },
              hidden.to(kGPU), weight.to(kGPU), bias.to(kGPU), trainable);
          REQUIRE(got.dh.dtype() == dt);
          if (dt == DType::f32) {
            require_same(got, cpu, 1e-4, 1e-6);
          } else {
            require_same(got, gpu_naive, 2e-2, 2e-4);
            test::require_close(cast(got.loss, DType::f32), cpu.loss, 1e-2, 1e-4);
            // bf16 rounding of the logits moves single entries a lot: compare relative norms.
            const Tensor diff = sub(cast(got.dh, DType::f32), cpu.dh);
            REQUIRE(std::sqrt(sum(square(diff)).item<double>() / sum(square(cpu.dh)).item<double>()) < 5e-2);
          }
        }
      }
    }
  }
}

TEST_CASE("cuda chunked_linear_loss stays within its memory budget", "[cuda][chunked_loss]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const int64_t n = 4096, h = 256, v = 32003;
  Tensor hidden = test::random_tensor({n, h}, DType::bf16, 11).to(kGPU);
  Tensor weight = mul(test::random_tensor({v, h}, DType::bf16, 12), 0.1).to(kGPU);
  Tensor targets = ids_with_ignored(n, v, 13).to(kGPU);
  nn::ChunkedLossOptions o;
  o.memory_budget_bytes = size_t{64} << 20;
  const auto measure = [&](bool trainable) {
    Tensor x = hidden.detach();
    x.set_requires_grad(true);
    Tensor w = weight.detach();
    w.set_requires_grad(trainable);
    nn::chunked_linear_loss(x, w, targets, nn::cross_entropy_loss(), o).backward();  // warm-up (plans, workspace)
    x.zero_grad();
    w.zero_grad();
    cuda::synchronize();
    const size_t before = cuda::memory_stats().allocated;
    cuda::reset_peak_memory_stats();
    nn::chunked_linear_loss(x, w, targets, nn::cross_entropy_loss(), o).backward();
    cuda::synchronize();
    return cuda::memory_stats().peak_allocated - before;
  };
  const size_t logits_f32 = size_t(n) * v * 4;       // 500 MiB: what the naive head holds, twice over
  const size_t frozen = measure(false);
  const size_t dh = size_t(n) * h * 2;
  WARN("peak extra, frozen weight: " << frozen << " bytes (full f32 logits: " << logits_f32 << ")");
  REQUIRE(frozen <= o.memory_budget_bytes + 2 * dh);
  const size_t trainable = measure(true);
  WARN("peak extra, trainable weight: " << trainable << " bytes");
  REQUIRE(trainable < logits_f32);
  // Cross-entropy is fused: one chunk of bf16 logits (their gradient written over them), d(hidden)
  // and d(weight) in bf16 (accumulated in place), a little slack for the per-chunk loss rows.
  const int64_t chunk = nn::chunked_loss_chunk_size(v, DType::bf16, o.memory_budget_bytes, true);
  const size_t chunk_bytes = size_t(chunk) * v * 2, slack = size_t{1} << 20;
  REQUIRE(frozen <= chunk_bytes + dh + slack);
  REQUIRE(trainable <= chunk_bytes + dh + size_t(v) * h * 2 + slack);
  // overwrite_hidden, hidden made by an op (as a model's final norm makes it): d(hidden) takes hidden's
  // memory, so no N x H beyond the chunk (x's gradient, N x H, comes after the chunk is freed).
  const auto measure_in_place = [&](bool trainable_w) {
    nn::ChunkedLossOptions ip = o;
    ip.overwrite_hidden = true;
    Tensor x = hidden.detach();
    x.set_requires_grad(true);
    Tensor w = weight.detach();
    w.set_requires_grad(trainable_w);
    nn::chunked_linear_loss(mul(x, 1.0), w, targets, nn::cross_entropy_loss(), ip).backward();  // warm-up
    x.zero_grad();
    w.zero_grad();
    Tensor made = mul(x, 1.0);
    cuda::synchronize();
    const size_t before = cuda::memory_stats().allocated;
    cuda::reset_peak_memory_stats();
    nn::chunked_linear_loss(made, w, targets, nn::cross_entropy_loss(), ip).backward();
    cuda::synchronize();
    const size_t peak = cuda::memory_stats().peak_allocated - before;
    // d(hidden), in hidden's memory, is x's gradient (1.0 * d(hidden))
    test::require_equal(cast(x.grad(), DType::f32).to(kCPU), cast(made, DType::f32).to(kCPU));
    return peak;
  };
  const size_t frozen_in_place = measure_in_place(false), trainable_in_place = measure_in_place(true);
  WARN("peak extra in place: frozen " << frozen_in_place << ", trainable " << trainable_in_place << " bytes");
  REQUIRE(frozen_in_place <= chunk_bytes + slack);
  REQUIRE(trainable_in_place <= chunk_bytes + size_t(v) * h * 2 + slack);
}

TEST_CASE("cuda cross_entropy_loss_grad_ matches the CPU, in place", "[cuda][chunked_loss]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const int64_t n = 37;
  // 32003: rows not 16-byte aligned (scalar loads); f64: the exact-exp path
  for (int64_t v : {int64_t{1000}, int64_t{20000}, int64_t{32003}, int64_t{128256}}) {
    for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
      for (const auto& [s, z] : {std::pair{0.0, 0.0}, std::pair{0.1, 1e-3}}) {
        CAPTURE(v, dtype_name(dt), s, z);
        Tensor logits = cast(mul(test::random_tensor({n, v}, DType::f32, 141), 3.0), dt);  // (n, V)
        Tensor targets = ids_with_ignored(n, v, 142);
        const Tensor scale = scalar_tensor(0.25, DType::f32);
        // The f32 reference runs in f64: summed in order in f32, 128,256 exponentials put up to 2.5e-4 into
        // the log-sum-exp (seen on the H100), more than the GPU's tree sum does.
        Tensor cpu = dt == DType::f32 ? cast(logits, DType::f64) : logits.clone();  // overwritten in place
        Tensor cpu_loss = cross_entropy_loss_grad_(cpu, targets, cast(scale, cpu.dtype()), -100, s, z);
        Tensor gpu = logits.to(kGPU);
        Tensor gpu_loss = cross_entropy_loss_grad_(gpu, targets.to(kGPU), scale.to(kGPU), -100, s, z);
        test::require_close(cast(gpu_loss.to(kCPU), DType::f64), cast(cpu_loss, DType::f64), 1e-4, 1e-5);
        const double tol = dt == DType::f64 ? 1e-6 : dt == DType::f32 ? 1e-4 : 1e-2;
        test::require_close(cast(gpu.to(kCPU), DType::f32), cast(cpu, DType::f32), tol, tol * 1e-3);
      }
    }
  }
}

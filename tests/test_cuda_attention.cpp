// CPU vs CUDA tests of scaled dot-product attention on both CUDA paths (cuDNN's fused SDPA and
// kiln's flash kernel): forward out + lse and backward dq/dk/dv on random inputs with GQA, causal
// masks with T != S, odd head dims, permuted views, a nonzero lse gradient, and autograd end to end.
#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "core/cuda/runtime.h"
#include "core/ops/attention.h"
#include "tests/helpers.h"
#if KILN_WITH_CUDA
#include "core/cuda/sdpa_cudnn.h"
#endif

using namespace kiln;

namespace {

#if KILN_WITH_CUDA
using Backend = cuda::SdpaBackend;
void use_backend(Backend b) { cuda::set_sdpa_backend(b); }
std::string last_path() { return cuda::last_sdpa_path(); }
#else
enum class Backend { automatic, cudnn, flash };
void use_backend(Backend) {}
std::string last_path() { return ""; }
#endif

// Selects the CUDA path for the scope, back to auto after.
struct BackendScope {
  explicit BackendScope(Backend b) { use_backend(b); }
  ~BackendScope() { use_backend(Backend::automatic); }
  BackendScope(const BackendScope&) = delete;
  BackendScope& operator=(const BackendScope&) = delete;
};

const Device kCuda{DeviceType::cuda, 0};

struct Case {
  int64_t b, hq, hkv, t, s, d, dv;
  bool causal;
  DType dtype;
};

std::string case_str(const Case& c) {
  return fmt::format("{} B{} Hq{} Hkv{} T{} S{} D{} Dv{} {}", dtype_name(c.dtype), c.b, c.hq, c.hkv, c.t, c.s, c.d,
                     c.dv, c.causal ? "causal" : "full");
}

// Relative error tolerance (to the largest reference magnitude) per input dtype.
double tol_for(DType d) {
  switch (d) {
    case DType::f64: return 1e-9;
    case DType::f32: return 1e-4;
    case DType::bf16: return 2e-2;
    default: return 1e-2;
  }
}

// max |got - ref| / max |ref| over finite elements; -inf (rows that see no key) must coincide.
double rel_error(const Tensor& got, const Tensor& ref) {
  REQUIRE(got.shape() == ref.shape());
  const std::vector<double> a = cast(got.to(kCPU), DType::f64).to_vector<double>();
  const std::vector<double> b = cast(ref.to(kCPU), DType::f64).to_vector<double>();
  double err = 0, mag = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b[i])) {
      REQUIRE(a[i] == b[i]);
      continue;
    }
    REQUIRE(std::isfinite(a[i]));
    err = std::max(err, std::abs(a[i] - b[i]));
    mag = std::max(mag, std::abs(b[i]));
  }
  return err / std::max(mag, 1e-30);
}

// (B, L, H, D) random values viewed as (B, H, L, D): the layout a projection produces.
Tensor permuted(const Shape& bhld, DType dt, uint64_t seed) {
  return permute(test::random_tensor({bhld[0], bhld[2], bhld[1], bhld[3]}, dt, seed), {0, 2, 1, 3});
}
Tensor on_cuda(const Tensor& x, bool keep_layout) {
  if (!keep_layout) return x.to(kCuda);
  // same permuted layout on the device: copy the (B, L, H, D) buffer, then permute it there
  return permute(permute(x, {0, 2, 1, 3}).contiguous().to(kCuda), {0, 2, 1, 3});
}

std::vector<Tensor> sdpa_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  return dispatch(std::make_shared<const prim::ScaledDotProductAttention>(causal, scale), {q, k, v});
}
std::vector<Tensor> sdpa_bwd(const std::vector<Tensor>& in, bool causal, double scale) {
  return dispatch(std::make_shared<const prim::SdpaBackward>(causal, scale), in);
}

// Runs one case on the CPU and on CUDA with backend `b`; returns the path CUDA took.
std::string check_case(const Case& c, Backend backend, bool permuted_layout, bool nonzero_dlse, uint64_t seed) {
  INFO(case_str(c) << (permuted_layout ? " permuted" : " contiguous") << (nonzero_dlse ? " dlse!=0" : ""));
  autograd::NoGradGuard no_grad;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  const Tensor q = permuted_layout ? permuted({c.b, c.hq, c.t, c.d}, c.dtype, seed) : test::random_tensor({c.b, c.hq, c.t, c.d}, c.dtype, seed);
  const Tensor k = permuted_layout ? permuted({c.b, c.hkv, c.s, c.d}, c.dtype, seed + 1) : test::random_tensor({c.b, c.hkv, c.s, c.d}, c.dtype, seed + 1);
  const Tensor v = permuted_layout ? permuted({c.b, c.hkv, c.s, c.dv}, c.dtype, seed + 2) : test::random_tensor({c.b, c.hkv, c.s, c.dv}, c.dtype, seed + 2);
  const Tensor dout = test::random_tensor({c.b, c.hq, c.t, c.dv}, c.dtype, seed + 3);
  const DType lse_dt = c.dtype == DType::f64 ? DType::f64 : DType::f32;
  const Tensor dlse = nonzero_dlse ? test::random_tensor({c.b, c.hq, c.t}, lse_dt, seed + 4) : zeros({c.b, c.hq, c.t}, lse_dt);

  const std::vector<Tensor> ref = sdpa_fwd(q, k, v, c.causal, scale);  // out, lse
  const std::vector<Tensor> ref_g = sdpa_bwd({q, k, v, ref[0], ref[1], dout, dlse}, c.causal, scale);

  BackendScope scope(backend);
  const Tensor qc = on_cuda(q, permuted_layout), kc = on_cuda(k, permuted_layout), vc = on_cuda(v, permuted_layout);
  const std::vector<Tensor> got = sdpa_fwd(qc, kc, vc, c.causal, scale);
  const std::string fwd_path = last_path();
  // backward from the CPU's out and lse, so both backends see identical inputs
  const std::vector<Tensor> got_g =
      sdpa_bwd({qc, kc, vc, ref[0].to(kCuda), ref[1].to(kCuda), dout.to(kCuda), dlse.to(kCuda)}, c.causal, scale);
  const std::string bwd_path = last_path();
  cuda::synchronize();

  const double tol = tol_for(c.dtype);
  const double lse_tol = c.dtype == DType::f64 ? 1e-10 : (lse_dt == DType::f32 && c.dtype == DType::f32 ? 1e-5 : 2e-3);
  const double e_out = rel_error(got[0], ref[0]), e_lse = rel_error(got[1], ref[1]);
  const double e_dq = rel_error(got_g[0], ref_g[0]), e_dk = rel_error(got_g[1], ref_g[1]),
               e_dv = rel_error(got_g[2], ref_g[2]);
  std::printf("[attention] %-44s %-10s %-5s/%-5s %s out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n", case_str(c).c_str(),
              permuted_layout ? "permuted" : "contiguous", fwd_path.c_str(), bwd_path.c_str(),
              nonzero_dlse ? "dlse!=0" : "dlse=0 ", e_out, e_lse, e_dq, e_dk, e_dv);
  REQUIRE(got[0].dtype() == c.dtype);
  REQUIRE(got[1].dtype() == lse_dt);
  CHECK(e_out <= tol);
  CHECK(e_lse <= lse_tol);
  CHECK(e_dq <= tol);
  CHECK(e_dk <= tol);
  CHECK(e_dv <= tol);
  REQUIRE(fwd_path == bwd_path);
  return fwd_path;
}

}  // namespace

TEST_CASE("cuda attention: the cuDNN path matches the CPU", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {
      {1, 8, 8, 128, 128, 64, 64, true, DType::bf16},      {2, 8, 2, 200, 200, 128, 128, true, DType::bf16},
      {1, 8, 1, 96, 160, 64, 64, true, DType::f16},        {2, 4, 4, 150, 90, 128, 128, false, DType::f16},
      {1, 16, 2, 256, 256, 128, 128, false, DType::bf16},  {1, 4, 1, 64, 192, 128, 128, true, DType::bf16},
      {2, 8, 2, 77, 77, 64, 64, false, DType::f16},        {1, 8, 8, 130, 130, 128, 128, true, DType::f16},
  };
  uint64_t seed = 100;
  for (const Case& c : cases) {
    for (bool perm : {true, false}) {
      CHECK(check_case(c, Backend::cudnn, perm, false, seed += 10) == "cudnn");
    }
  }
}

TEST_CASE("cuda attention: the cuDNN backward in pieces (sequences, kv-head groups) matches one call", "[cuda][attention]") {
#if !KILN_WITH_CUDA
  SKIP("built without CUDA");
#else
  if (!cuda::is_available()) SKIP("no CUDA device");
  // A workspace limit of 0 splits to the smallest groups; long sequences do so at the default limit.
  struct LimitScope {
    size_t saved = cuda::sdpa_backward_workspace_limit();
    ~LimitScope() { cuda::set_sdpa_backward_workspace_limit(saved); }
  } restore;
  struct Split {
    Case c;
    int calls;  // pieces at limit 0: sequences x kv-head groups
  };
  const Split cases[] = {
      {{2, 8, 2, 200, 200, 128, 128, true, DType::bf16}, 4},  {{1, 16, 4, 256, 256, 128, 128, false, DType::bf16}, 4},
      {{1, 8, 8, 130, 130, 64, 64, true, DType::f16}, 4},     // groups of 2: one kv head's lse (130 f32) is not 16-byte aligned
      {{1, 4, 1, 64, 192, 128, 128, true, DType::bf16}, 1},
  };
  uint64_t seed = 900;
  for (const Split& sc : cases) {
    for (bool perm : {true, false}) {
      cuda::set_sdpa_backward_workspace_limit(0);
      CHECK(check_case(sc.c, Backend::cudnn, perm, false, seed += 10) == "cudnn");
      CHECK(cuda::last_sdpa_backward_calls() == sc.calls);
      cuda::set_sdpa_backward_workspace_limit(size_t{1} << 40);
      CHECK(check_case(sc.c, Backend::cudnn, perm, false, seed) == "cudnn");
      CHECK(cuda::last_sdpa_backward_calls() == 1);
    }
  }
#endif
}

TEST_CASE("cuda attention: the flash kernel matches the CPU", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {
      {1, 4, 2, 77, 77, 40, 40, true, DType::bf16},     {2, 8, 1, 100, 140, 80, 80, true, DType::f16},
      {1, 4, 4, 90, 50, 80, 80, true, DType::f32},      {2, 8, 2, 130, 130, 64, 64, false, DType::f32},
      {1, 2, 1, 70, 70, 160, 200, true, DType::f32},    {1, 2, 2, 33, 47, 24, 40, false, DType::f64},
      {1, 8, 8, 128, 128, 128, 128, true, DType::bf16}, {2, 8, 2, 200, 200, 128, 128, true, DType::bf16},
      {1, 8, 1, 96, 160, 64, 64, true, DType::f16},     {1, 4, 2, 65, 3, 8, 8, true, DType::f32},
      {1, 2, 1, 40, 0, 16, 16, false, DType::f32},
  };
  uint64_t seed = 300;
  for (const Case& c : cases) {
    for (bool perm : {true, false}) {
      CHECK(check_case(c, Backend::flash, perm, false, seed += 10) == "flash");
    }
  }
}

TEST_CASE("cuda attention: a nonzero lse gradient is honoured on both paths", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Case cases[] = {{1, 8, 2, 128, 128, 64, 64, true, DType::bf16}, {2, 4, 1, 100, 150, 128, 128, false, DType::f16},
                        {1, 4, 2, 60, 60, 40, 40, true, DType::f32}};
  uint64_t seed = 500;
  for (const Case& c : cases) {
    check_case(c, Backend::automatic, true, true, seed += 10);
    check_case(c, Backend::flash, false, true, seed += 10);
  }
  // auto picks cuDNN for bf16/f16 head dim 64/128 and the flash kernel for f32
  CHECK(check_case(cases[0], Backend::automatic, true, false, 600) == "cudnn");
  CHECK(check_case(cases[2], Backend::automatic, true, false, 610) == "flash");
}

TEST_CASE("cuda attention: autograd gradients match the CPU", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : {DType::bf16, DType::f32}) {
    const Case c{2, 8, 2, 96, 96, 64, 64, true, dt};
    INFO(case_str(c));
    const Tensor q = permuted({c.b, c.hq, c.t, c.d}, dt, 700), k = permuted({c.b, c.hkv, c.s, c.d}, dt, 701);
    const Tensor v = permuted({c.b, c.hkv, c.s, c.dv}, dt, 702), g = test::random_tensor({c.b, c.hq, c.t, c.dv}, dt, 703);
    std::vector<Tensor> grads[2];
    for (int dev = 0; dev < 2; ++dev) {
      Tensor qi = (dev ? on_cuda(q, true) : q).detach().set_requires_grad();
      Tensor ki = (dev ? on_cuda(k, true) : k).detach().set_requires_grad();
      Tensor vi = (dev ? on_cuda(v, true) : v).detach().set_requires_grad();
      Tensor out = scaled_dot_product_attention(qi, ki, vi, c.causal);
      out.backward(dev ? g.to(kCuda) : g);  // the lse output's cotangent is autograd's zeros
      grads[dev] = {qi.grad(), ki.grad(), vi.grad()};
    }
    for (size_t i = 0; i < 3; ++i) CHECK(rel_error(grads[1][i], grads[0][i]) <= tol_for(dt));
  }
}

TEST_CASE("cuda attention: heads after the positions match the CPU on both paths, forward and backward", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  // (B, T, H, D) operands: cuDNN writes out and the gradients through their strides, the flash kernel
  // too (f32 always takes it; bf16 is forced onto it once).
  const Case cases[] = {{2, 8, 2, 96, 96, 64, 64, true, DType::bf16}, {1, 4, 2, 80, 112, 128, 128, true, DType::bf16},
                        {2, 8, 2, 96, 96, 64, 64, true, DType::f32}};
  for (const Case& c : cases) {
    for (Backend backend : {Backend::automatic, Backend::flash}) {
      if (c.dtype == DType::f32 && backend == Backend::flash) continue;
      INFO(case_str(c) << (backend == Backend::flash ? " flash" : " auto"));
      const Tensor q = test::random_tensor({c.b, c.t, c.hq, c.d}, c.dtype, 720);
      const Tensor k = test::random_tensor({c.b, c.s, c.hkv, c.d}, c.dtype, 721);
      const Tensor v = test::random_tensor({c.b, c.s, c.hkv, c.dv}, c.dtype, 722);
      const Tensor g = test::random_tensor({c.b, c.t, c.hq, c.dv}, c.dtype, 723);
      std::vector<Tensor> res[2];
      std::string path;
      for (int dev = 0; dev < 2; ++dev) {
        BackendScope scope(dev ? backend : Backend::automatic);
        Tensor qi = (dev ? q.to(kCuda) : q).detach().set_requires_grad();
        Tensor ki = (dev ? k.to(kCuda) : k).detach().set_requires_grad();
        Tensor vi = (dev ? v.to(kCuda) : v).detach().set_requires_grad();
        Tensor out = scaled_dot_product_attention_heads_last(qi, ki, vi, c.causal);
        out.backward(dev ? g.to(kCuda) : g);
        if (dev) path = last_path();
        res[dev] = {out, qi.grad(), ki.grad(), vi.grad()};
      }
      CHECK(path == (c.dtype == DType::bf16 && backend == Backend::automatic ? "cudnn" : "flash"));
      for (size_t i = 0; i < 4; ++i) {
        INFO("tensor " << i);
        REQUIRE(res[1][i].is_contiguous());
        CHECK(rel_error(res[1][i], res[0][i]) <= tol_for(c.dtype));
      }
    }
  }
}

TEST_CASE("cuda attention: forcing cuDNN on a call it cannot take is an error", "[cuda][attention]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  BackendScope scope(Backend::cudnn);
  const Tensor q = test::random_tensor({1, 2, 8, 16}, DType::f32, 800).to(kCuda);
  REQUIRE_THROWS_AS(sdpa_fwd(q, q, q, true, 0.25), Error);
}

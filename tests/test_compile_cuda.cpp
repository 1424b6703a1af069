// compile/ on CUDA: generated kernels (NVRTC) against eager CUDA ops, forward and backward, for each
// fusable pattern in f32 and bf16, contiguous and strided inputs, fixed and symbolic row lengths; a
// compiled Llama layer; the disk cache (a fresh in-memory cache compiles nothing). The NVRTC-only
// tests run wherever kiln was built with CUDA (no GPU needed); the others SKIP without a GPU.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <unistd.h>

#include <filesystem>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "compile/codegen.h"
#include "compile/compile.h"
#include "compile/cubin.h"
#include "compile/plan.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "nn/llama.h"
#include "tests/helpers.h"

using namespace kiln;

namespace {

const Device kGPU{DeviceType::cuda, 0};

// A KILN_CACHE_DIR of its own for the scope.
struct TempCacheDir {
  std::filesystem::path dir;
  std::string previous;
  bool had = false;
  explicit TempCacheDir(const char* tag) {
    dir = std::filesystem::temp_directory_path() / (std::string("kiln_compile_") + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    if (const char* p = std::getenv("KILN_CACHE_DIR")) previous = p, had = true;
    ::setenv("KILN_CACHE_DIR", dir.string().c_str(), 1);
  }
  ~TempCacheDir() {
    if (had) {
      ::setenv("KILN_CACHE_DIR", previous.c_str(), 1);
    } else {
      ::unsetenv("KILN_CACHE_DIR");
    }
    std::filesystem::remove_all(dir);
  }
};

std::vector<compile::Fn> patterns() {
  return {
      [](const std::vector<Tensor>& in) {  // residual add + rms_norm
        Tensor h = in[0] + in[1];
        return std::vector<Tensor>{rms_norm(h, in[2], 1e-6), h};
      },
      [](const std::vector<Tensor>& in) {  // softmax-like rows, log-sum-exp
        return std::vector<Tensor>{softmax(in[0] * 0.25 + in[2], -1), logsumexp(in[1], {-1})};
      },
      [](const std::vector<Tensor>& in) {  // swiglu composite and a where
        return std::vector<Tensor>{swiglu_composite(in[0], in[1]), where(gt(in[0], in[1]), in[0], in[1] * 2.0)};
      },
      [](const std::vector<Tensor>& in) {  // composite softmax, mean and min rows
        Tensor z = in[0] + in[1];
        Tensor e = exp(z - amax(z, {-1}, true));
        return std::vector<Tensor>{e / sum(e, {-1}, true), mean(z, {-1}), amin(z, {-1}, true)};
      },
      [](const std::vector<Tensor>& in) {  // rope-like halves
        Tensor a = narrow(in[0], -1, 0, 16), b = narrow(in[0], -1, 16, 16);
        Tensor c = narrow(in[2], -1, 0, 16), s = narrow(in[2], -1, 16, 16);
        return std::vector<Tensor>{cat({a * c - b * s, b * c + a * s}, -1)};
      },
  };
}

std::vector<Tensor> pattern_inputs(DType dt, uint64_t seed, bool strided) {
  auto gpu = [&](const Tensor& t) { return strided ? test::make_noncontiguous(t.to(kGPU)) : t.to(kGPU); };
  return {gpu(test::random_tensor({3, 7, 32}, dt, seed)), gpu(test::random_tensor({3, 7, 32}, dt, seed + 1)),
          test::random_tensor({32}, dt, seed + 2).to(kGPU)};
}

}  // namespace

TEST_CASE("compile cuda: generated kernels compile with NVRTC, and the disk cache serves a fresh process", "[compile][nvrtc]") {
  if (!cuda::built_with_cuda()) SKIP("kiln was built without CUDA");
  TempCacheDir cache("nvrtc");
  autograd::NoGradGuard ng;
  std::vector<std::string> sources;
  for (const compile::Fn& f : patterns()) {
    const std::vector<Tensor> in = {test::random_tensor({3, 7, 32}, DType::bf16, 1), test::random_tensor({3, 7, 32}, DType::bf16, 2),
                                    test::random_tensor({32}, DType::bf16, 3)};
    auto t = compile::trace(f, in, false);
    compile::PlanInput pi;
    pi.graph = &t->forward;
    const compile::Plan plan = compile::build_plan(pi);
    REQUIRE_FALSE(plan.fusion.groups.empty());
    for (const compile::Group& g : plan.fusion.groups) {
      compile::Variant v;
      v.rank = 3;
      if (!g.program.row) v.access.assign(g.program.inputs.size(), compile::Access::strided);
      sources.push_back(compile::generate_cuda(g.program, v));
      // the vector variant: 8 elements per access of every contiguous (row programs: element-level) slot
      compile::Variant vv = v;
      vv.vec = 8;
      vv.access.clear();
      for (const auto& slot : g.program.inputs)
        vv.access.push_back(g.program.row && slot.level != compile::Level::element ? compile::Access::strided
                                                                                   : compile::Access::contiguous);
      sources.push_back(compile::generate_cuda(g.program, vv));
      REQUIRE_THAT(sources.back(), Catch::Matchers::ContainsSubstring("kiln_ldv(p"));
    }
  }
  compile::reset_stats();
  for (const std::string& s : sources) REQUIRE_FALSE(compile::compile_cubin(s, "sm_90").empty());
  REQUIRE(compile::stats().kernel_compiles == static_cast<int64_t>(sources.size()));
  REQUIRE(compile::stats().kernel_compile_ms > 0);
  // a second compile (a fresh process would find the same files) compiles nothing
  compile::reset_stats();
  for (const std::string& s : sources) REQUIRE_FALSE(compile::compile_cubin(s, "sm_90").empty());
  REQUIRE(compile::stats().kernel_compiles == 0);
  REQUIRE(compile::stats().kernel_disk_hits == static_cast<int64_t>(sources.size()));
  // another architecture is another key
  REQUIRE_FALSE(compile::compile_cubin(sources[0], "sm_80").empty());
  REQUIRE(compile::stats().kernel_compiles == 1);
}

TEST_CASE("compile cuda: fused patterns match eager CUDA, forward and backward", "[compile][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : {DType::f32, DType::bf16}) {
    for (bool strided : {false, true}) {
      const double rtol = dt == DType::f32 ? 1e-5 : 2e-2, atol = dt == DType::f32 ? 1e-5 : 2e-2;
      int i = 0;
      for (const compile::Fn& f : patterns()) {
        INFO("pattern " << i++ << " " << dtype_name(dt) << (strided ? " strided" : ""));
        std::vector<Tensor> in = pattern_inputs(dt, 10 + static_cast<uint64_t>(i), strided);
        std::vector<Tensor> le, lc;
        for (const Tensor& t : in) {
          le.push_back(t.detach().set_requires_grad(true));
          lc.push_back(t.detach().set_requires_grad(true));
        }
        compile::reset_stats();
        const std::vector<Tensor> e = f(le), c = compile::compile(f)(lc);
        REQUIRE(compile::stats().last_forward_groups >= 1);
        std::vector<Tensor> ge, roots_e, roots_c;
        for (size_t k = 0; k < e.size(); ++k) {
          test::require_close(c[k].to(kCPU), e[k].to(kCPU), rtol, atol);
          if (!e[k].requires_grad()) continue;
          roots_e.push_back(e[k]);
          roots_c.push_back(c[k]);
          ge.push_back(test::random_tensor(e[k].shape(), dt, 40 + k).to(kGPU));
        }
        const std::vector<Tensor> de = autograd::grad(roots_e, le, ge), dc = autograd::grad(roots_c, lc, ge);
        for (size_t k = 0; k < de.size(); ++k) test::require_close(dc[k].to(kCPU), de[k].to(kCPU), rtol, atol);
      }
    }
  }
}

TEST_CASE("compile cuda: dropout draws eager's Philox numbers; fixed and symbolic row lengths agree", "[compile][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  autograd::NoGradGuard ng;
  Tensor x = test::random_tensor({4, 9, 40}, DType::f32, 50).to(kGPU);
  auto f = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{dropout(in[0] * 2.0 + 1.0, 0.3) * in[0]}; };
  manual_seed(77);
  const Tensor eager = f({x})[0];
  manual_seed(77);
  const Tensor got = compile::compile(f)({x})[0];
  test::require_close(got.to(kCPU), eager.to(kCPU), 1e-6, 1e-6);
  // one symbolic plan over many row counts and row lengths; the CPU interpreter as the reference
  compile::CompileOptions o;
  o.dynamic_dims = {{0, 0}, {0, 1}};
  const compile::CompiledFunction rows = compile::compile(
      [](const std::vector<Tensor>& in) {
        Tensor h = in[0] * 1.5 - 0.25;
        return std::vector<Tensor>{softmax(h, -1) + rms_norm(h, ones({h.size(-1)}, h.dtype(), h.device()), 1e-5)};
      },
      o);
  compile::reset_stats();
  for (int64_t r : {1, 5, 33}) {
    for (int64_t d : {1, 31, 32, 257, 1000}) {
      INFO(r << " x " << d);
      const Tensor a = test::random_tensor({r, d}, DType::f32, static_cast<uint64_t>(r * 1000 + d));
      test::require_close(rows({a.to(kGPU)})[0].to(kCPU), rows({a})[0], 1e-5, 1e-6);
    }
  }
  REQUIRE(compile::stats().compilations == 2);  // one per device
}

TEST_CASE("compile cuda: a compiled Llama layer matches eager; 20 lengths, 1 compilation", "[compile][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  nn::LlamaConfig c;
  c.vocab_size = 64;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  nn::LlamaOptions o;
  o.seed = 5;
  o.device = kGPU;
  nn::Llama eager(c, o), compiled(c, o);
  compile::CompileOptions co;
  co.dynamic_dims = {{0, 1}};
  auto handles = compile::compile_llama_layers(compiled, co);
  compile::reset_stats();
  for (int64_t t = 10; t < 30; ++t) {
    Generator gen(static_cast<uint64_t>(t));
    const Tensor ids = randint(0, 64, {2, t}, DType::i64, kGPU, &gen);
    const Tensor he = eager(ids), hc = compiled(ids);
    test::require_close(hc.to(kCPU), he.to(kCPU), 1e-4, 1e-5);
    const Tensor r = test::random_tensor(he.shape(), DType::f32, 7).to(kGPU);
    eager.zero_grad();
    compiled.zero_grad();
    sum(he * r).backward();
    sum(hc * r).backward();
    const auto pe = eager.named_parameters(), pc = compiled.named_parameters();
    for (size_t i = 0; i < pe.size(); ++i) {
      if (!pe[i].second.grad().defined()) continue;
      INFO(pe[i].first << " at T=" << t);
      const Tensor ref = pe[i].second.grad().to(kCPU), got = pc[i].second.grad().to(kCPU);
      const double scale = amax(abs(ref)).item<float>();
      REQUIRE(amax(abs(got - ref)).item<float>() <= 1e-5 * scale + 1e-7);
    }
  }
  REQUIRE(compile::stats().compilations == 2);  // one forward and one backward plan for every length and layer
  REQUIRE(compile::stats().eager_calls == 0);
}

TEST_CASE("compile cuda: a fresh in-memory cache loads kernels from disk and compiles nothing", "[compile][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  TempCacheDir cache("disk");
  autograd::NoGradGuard ng;
  const compile::Fn f = patterns()[0];
  const std::vector<Tensor> in = pattern_inputs(DType::f32, 60, false);
  compile::clear_caches();
  compile::reset_stats();
  const std::vector<Tensor> first = compile::compile(f)(in);
  REQUIRE(compile::stats().kernel_compiles >= 1);
  compile::clear_caches();  // as a new process would start
  compile::reset_stats();
  const std::vector<Tensor> second = compile::compile(f)(in);
  REQUIRE(compile::stats().kernel_compiles == 0);
  REQUIRE(compile::stats().kernel_disk_hits >= 1);
  for (size_t k = 0; k < first.size(); ++k) test::require_equal(second[k].to(kCPU), first[k].to(kCPU));
}

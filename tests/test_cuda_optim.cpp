// Optimisers on CUDA against the CPU: the fused multi-tensor AdamW kernel over many tensors of mixed
// sizes and alignments (f32/bf16/f16, one adamw_step op per dtype per step), AdamW/SGD optimizers,
// clip_grad_norm_ (fused: one norm and one scale op), the multi-tensor L2 norm / scale kernels against
// the CPU (mixed dtypes, misaligned views, many sizes), and a save/load resume on the device.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>
#include <limits>

#include "core/cuda/runtime.h"
#include "core/ops/optim.h"
#include "nn/optim.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
using kiln::test::make_noncontiguous;
using kiln::test::OpCounter;
using kiln::test::random_tensor;
using kiln::test::require_close;
using kiln::test::require_equal;

namespace {

const Device kGPU{DeviceType::cuda, 0};

// Sizes around the vector width and the 16384-element chunk, tiny and large, plus many random ones.
std::vector<int64_t> mixed_sizes() {
  std::vector<int64_t> s = {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 1023, 16383, 16384, 16385, 32768 + 5, 65536 + 3, 100003,
                            (1 << 20) + 1};
  Generator gen(123);
  std::vector<int64_t> r = randint(1, 5000, {300}, DType::i64, kCPU, &gen).to_vector<int64_t>();
  s.insert(s.end(), r.begin(), r.end());
  return s;
}

nn::NamedTensors cpu_params(DType dt, uint64_t seed, const std::vector<int64_t>& sizes) {
  nn::NamedTensors ps;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string name = fmt::format("p{}", i);
    ps.emplace_back(name, random_tensor({sizes[i]}, dt, seed + i).set_requires_grad(true));
  }
  return ps;
}
nn::NamedTensors to_gpu(const nn::NamedTensors& ps) {
  nn::NamedTensors out;
  for (const auto& [n, p] : ps) out.emplace_back(n, p.detach().to(kGPU).set_requires_grad(true));
  return out;
}
// The same grads on both sides; param k has none when (s + k) % 5 == 0.
void set_grads(const nn::NamedTensors& c, const nn::NamedTensors& g, int s, uint64_t seed) {
  for (size_t k = 0; k < c.size(); ++k) {
    Tensor pc = c[k].second, pg = g[k].second;
    if ((s + static_cast<int>(k)) % 5 == 0) {
      pc.zero_grad(), pg.zero_grad();
      continue;
    }
    Tensor gr = random_tensor(pc.shape(), pc.dtype(), seed * 7919 + static_cast<uint64_t>(s) * 131 + k);
    pc.set_grad(gr);
    pg.set_grad(gr.to(kGPU));
  }
}
void require_same(const Tensor& gpu, const Tensor& cpu) {
  // The kernels round identically; the tolerance only allows for a last-bit difference.
  require_close(gpu.to(kCPU), cpu, cpu.dtype() == DType::f32 ? 1e-6 : 8e-3, 1e-7);
}

}  // namespace

TEST_CASE("fused adamw_step_ on CUDA matches the CPU over many tensors in one op", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<int64_t> sizes = mixed_sizes();
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    CAPTURE(dtype_name(dt));
    const size_t n = sizes.size();
    std::vector<Tensor> pc, gc, mc, vc, pg, gg, mg, vg;
    std::vector<int64_t> steps;
    Tensor base_c = random_tensor({sizes[5] + 1}, dt, 900);  // a misaligned param: elements 1..
    for (size_t i = 0; i < n; ++i) {
      Tensor p = i == 5 ? base_c.narrow(0, 1, sizes[5]) : random_tensor({sizes[i]}, dt, 1000 + i);
      pc.push_back(p.contiguous());
      mc.push_back(mul(random_tensor({sizes[i]}, DType::f32, 2000 + i), 0.1));
      vc.push_back(mul(square(random_tensor({sizes[i]}, DType::f32, 3000 + i)), 0.01));
      steps.push_back(1 + static_cast<int64_t>(i % 9));
    }
    Tensor base_g = base_c.to(kGPU);
    for (size_t i = 0; i < n; ++i) {
      pg.push_back(i == 5 ? base_g.narrow(0, 1, sizes[5]) : pc[i].to(kGPU));
      mg.push_back(mc[i].to(kGPU));
      vg.push_back(vc[i].to(kGPU));
    }
    for (int s = 0; s < 3; ++s) {
      gc.clear(), gg.clear();
      for (size_t i = 0; i < n; ++i) {
        gc.push_back(random_tensor({sizes[i]}, dt, 4000 + 1000 * static_cast<uint64_t>(s) + i));
        gg.push_back(gc.back().to(kGPU));
      }
      const AdamWHyper h{1e-2 * (s + 1), 0.9, 0.999, 1e-8, s == 1 ? 0.0 : 0.1};
      adamw_step_(pc, gc, mc, vc, steps, h);
      OpCounter ops;
      adamw_step_(pg, gg, mg, vg, steps, h);
      REQUIRE(ops.count("adamw_step") == 1);
      REQUIRE(ops.names.size() == 1);  // no per-tensor ops: the grads are contiguous
      for (int64_t& t : steps) ++t;
    }
    for (size_t i = 0; i < n; ++i) {
      CAPTURE(i, sizes[i]);
      require_same(pg[i], pc[i]);
      require_same(mg[i], mc[i]);
      require_same(vg[i], vc[i]);
    }
    require_equal(base_g.narrow(0, 0, 1).to(kCPU), base_c.narrow(0, 0, 1));  // the element before is untouched
  }
}

TEST_CASE("AdamW and SGD on CUDA match the CPU optimizers", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  std::vector<int64_t> sizes = {3, 4097, 16384 * 3 + 1, 5, 70000, 1};
  nn::NamedTensors c = cpu_params(DType::f32, 10, sizes);
  for (const auto& [n, p] : cpu_params(DType::bf16, 20, {16, 33, 1000}))
    c.emplace_back(fmt::format("b{}", n), p);
  nn::NamedTensors g = to_gpu(c);
  nn::AdamW oc(c, {2e-2, 0.9, 0.99, 1e-6, 0.05}), og(g, {2e-2, 0.9, 0.99, 1e-6, 0.05});
  for (int s = 1; s <= 4; ++s) {
    set_grads(c, g, s, 11);
    oc.step();
    OpCounter ops;
    og.step();
    REQUIRE(ops.count("adamw_step") == 2);  // one fused op per dtype
  }
  for (size_t k = 0; k < c.size(); ++k) {
    CAPTURE(c[k].first);
    require_same(g[k].second, c[k].second);
    for (const auto& [key, t] : oc.state(c[k].first)) require_same(og.state(g[k].first).at(key), t);
  }
  nn::NamedTensors sc = cpu_params(DType::f32, 30, sizes), sg = to_gpu(sc);
  nn::SGD sgc(sc, {0.05, 0.9, 0.0, true, 0.01}), sgg(sg, {0.05, 0.9, 0.0, true, 0.01});
  for (int s = 1; s <= 3; ++s) {
    set_grads(sc, sg, s, 31);
    sgc.step();
    sgg.step();
  }
  for (size_t k = 0; k < sc.size(); ++k) require_close(sg[k].second.to(kCPU), sc[k].second, 1e-5, 1e-6);
}

TEST_CASE("clip_grad_norm_ on CUDA matches the CPU", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<int64_t> sizes = mixed_sizes();
  nn::NamedTensors c = cpu_params(DType::f32, 40, sizes), g = to_gpu(c);
  set_grads(c, g, 1, 41);
  const double nc = nn::clip_grad_norm_(c, 3.0), ng = nn::clip_grad_norm_(g, 3.0);
  REQUIRE(ng == Catch::Approx(nc).epsilon(1e-5));
  REQUIRE(nc > 3.0);
  for (size_t k = 0; k < c.size(); ++k) {
    if (c[k].second.grad().defined()) require_close(g[k].second.grad().to(kCPU), c[k].second.grad(), 1e-5, 1e-7);
  }
}

TEST_CASE("clip_grad_norm_ on CUDA is one fused norm and one fused scale", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<int64_t> sizes = mixed_sizes();
  for (DType dt : {DType::bf16, DType::f32}) {
    nn::NamedTensors c = cpu_params(dt, 60, sizes), g = to_gpu(c);
    set_grads(c, g, 1, 61);
    OpCounter ops;
    const double ng = nn::clip_grad_norm_(g, 0.5);
    REQUIRE(ops.count("multi_tensor_l2_norm") == 1);
    REQUIRE(ops.count("multi_tensor_scale") == 1);
    CAPTURE(ops.names);
    REQUIRE(ops.names.size() < 10);  // norm, its read-back, scale: no per-grad ops (318 grads)
    const double nc = nn::clip_grad_norm_(c, 0.5);
    REQUIRE(ng == Catch::Approx(nc).epsilon(1e-5));
    const double tol = dt == DType::f32 ? 1e-5 : 8e-3;
    for (size_t k = 0; k < c.size(); ++k) {
      if (c[k].second.grad().defined()) require_close(g[k].second.grad().to(kCPU), c[k].second.grad(), tol, 1e-7);
    }
  }
}

// Tensors of every size of mixed_sizes(), dtypes cycling f32/bf16/f16, some starting one element
// into a larger buffer (not 16-byte aligned: the scalar path).
std::vector<Tensor> multi_inputs(uint64_t seed, const Device& dev) {
  const std::vector<int64_t> sizes = mixed_sizes();
  const DType dts[] = {DType::f32, DType::bf16, DType::f16};
  std::vector<Tensor> ts;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const bool shifted = i % 4 == 1;
    Tensor t = random_tensor({sizes[i] + (shifted ? 1 : 0)}, dts[i % 3], seed + i).to(dev);
    ts.push_back(shifted ? narrow(t, 0, 1, sizes[i]) : t);
  }
  return ts;
}

TEST_CASE("multi_tensor_l2_norm on CUDA matches the CPU", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<Tensor> g = multi_inputs(700, kGPU);
  std::vector<Tensor> c;
  for (const Tensor& t : g) c.push_back(t.to(kCPU));
  const Tensor ng = multi_tensor_l2_norm(g);
  REQUIRE(ng.device() == kGPU);
  REQUIRE(ng.dtype() == DType::f32);
  const double want = multi_tensor_l2_norm(c).item<double>();
  REQUIRE(ng.item<double>() == Catch::Approx(want).epsilon(1e-5));
  REQUIRE(multi_tensor_l2_norm(g).item<float>() == ng.item<float>());  // deterministic
  // Single tensors, a non-contiguous one, empty ones, non-finite values.
  for (size_t k : {size_t{0}, size_t{13}, size_t{17}, size_t{20}}) {
    CAPTURE(k);
    REQUIRE(multi_tensor_l2_norm({g[k]}).item<double>() ==
            Catch::Approx(multi_tensor_l2_norm({c[k]}).item<double>()).epsilon(1e-5));
  }
  const Tensor nc = make_noncontiguous(random_tensor({33, 65}, DType::bf16, 3));
  REQUIRE(multi_tensor_l2_norm({nc.to(kGPU)}).item<double>() ==
          Catch::Approx(multi_tensor_l2_norm({nc}).item<double>()).epsilon(1e-5));
  REQUIRE(multi_tensor_l2_norm({zeros({0}, DType::f32, kGPU)}).item<double>() == 0.0);
  Tensor bad = random_tensor({5000}, DType::bf16, 4);
  bad.data_ptr<bf16>()[4097] = bf16(std::numeric_limits<float>::infinity());
  REQUIRE(std::isinf(multi_tensor_l2_norm({g[0], bad.to(kGPU)}).item<double>()));
  REQUIRE_THROWS_WITH(multi_tensor_l2_norm({g[0], g[1].to(kCPU)}), ContainsSubstring("[multi_tensor_l2_norm]"));
}

TEST_CASE("multi_tensor_scale_ on CUDA matches the CPU bit for bit", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<Tensor> g = multi_inputs(800, kGPU);
  std::vector<Tensor> c;
  for (const Tensor& t : g) c.push_back(t.to(kCPU));
  OpCounter ops;
  multi_tensor_scale_(g, 0.0173);
  REQUIRE(ops.count("multi_tensor_scale") == 1);
  multi_tensor_scale_(c, 0.0173);
  for (size_t k = 0; k < c.size(); ++k) {
    CAPTURE(k);
    require_equal(g[k].to(kCPU), c[k]);
  }
}

TEST_CASE("AdamW on CUDA resumes bit-identically from a saved state", "[cuda][optim]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  nn::NamedTensors c = cpu_params(DType::bf16, 50, {100, 16385, 7});
  nn::NamedTensors a = to_gpu(c), b = to_gpu(c), unused = to_gpu(c);
  nn::AdamW oa(a, {1e-2, 0.9, 0.999, 1e-8, 0.01});
  for (int s = 1; s <= 3; ++s) set_grads(unused, a, s, 51), oa.step();
  const std::string path = (std::filesystem::temp_directory_path() / "kiln_cuda_optim.safetensors").string();
  oa.save(path);
  for (size_t k = 0; k < a.size(); ++k) copy_(b[k].second.detach(), a[k].second.detach());
  nn::AdamW ob(b, {});
  ob.load(path);
  REQUIRE(ob.state(b[1].first).at("exp_avg").device() == kGPU);
  for (int s = 4; s <= 6; ++s) {
    set_grads(unused, a, s, 51), oa.step();
    set_grads(unused, b, s, 51), ob.step();
  }
  for (size_t k = 0; k < a.size(); ++k) require_equal(a[k].second.to(kCPU), b[k].second.to(kCPU));
  std::filesystem::remove(path);
}

// NF4 on CUDA: quantisation bit for bit against bitsandbytes' CUDA output (fixtures) and against the
// CPU path, the one-kernel dequantisation against the CPU for many shapes, dtypes and misaligned
// buffers, the tiny bnb-4bit Llama on the GPU, and nf4_linear (values, gradients, memory kept).
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>

#include "core/cuda/runtime.h"
#include "quant/bnb_checkpoint.h"
#include "quant/nf4.h"
#include "tests/helpers.h"
#include "tests/nf4_fixtures.h"

namespace fs = std::filesystem;

namespace kiln {
namespace {

using namespace test::nf4;
using test::random_tensor;
const Device kGPU{DeviceType::cuda, 0};

TEST_CASE("cuda nf4 quantisation equals bitsandbytes' CUDA bytes", "[cuda][nf4]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  auto f = io::SafetensorsFile::open((fixtures() / "blockwise.safetensors").string());
  for (const std::string& p : fixture_cases(f)) {
    INFO("fixture " << p);
    const Tensor w = f.get(p + "w").to(kGPU);
    const quant::NF4Weight bnb = fixture_weight(f, p);
    quant::NF4Weight ours = quant::quantize_nf4(w, bnb.double_quant);
    REQUIRE(ours.device() == kGPU);
    require_bytes_equal(ours.packed, bnb.packed);
    require_bytes_equal(quant::quantize_nf4(w, false).absmax, f.get(p + "absmax_f32"));
    if (bnb.double_quant) {
      REQUIRE(std::fabs(ours.offset - bnb.offset) <= 2e-6f * std::fabs(bnb.offset));
      auto nested = quant::double_quantize_absmax(f.get(p + "absmax_f32").to(kGPU), bnb.offset);
      require_bytes_equal(nested.nested_absmax, bnb.nested_absmax);
      require_bytes_equal(nested.codes, bnb.absmax);
    }
    const quant::NF4Weight on_gpu = quant::to_device(bnb, kGPU);
    require_bytes_equal(quant::dequantize_nf4(on_gpu, w.dtype()), f.get(p + "dequant"));
    if (f.contains(p + "dequant_f32")) {
      require_bytes_equal(quant::dequantize_nf4(on_gpu, DType::f32), f.get(p + "dequant_f32"));
      require_bytes_equal(quant::dequantize_nf4(on_gpu, DType::bf16), f.get(p + "dequant_bf16"));
    }
  }
}

TEST_CASE("cuda nf4 tiny Llama bnb-4bit checkpoint: quantise and dequantise on the GPU", "[cuda][nf4]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  auto model = io::SafetensorsFile::open((fixtures() / "tiny_llama_bnb4" / "model.safetensors").string());
  auto ref = io::SafetensorsFile::open((fixtures() / "tiny_llama_reference.safetensors").string());
  int linears = 0;
  for (const std::string& key : model.keys()) {
    if (!quant::is_bnb_nf4(model, key)) continue;
    ++linears;
    INFO("weight " << key);
    quant::NF4Weight q = quant::to_device(quant::read_bnb_nf4(model, key), kGPU);
    require_bytes_equal(quant::dequantize_nf4(q, DType::bf16), ref.get(key + ".dequant"));
    quant::NF4Weight ours = quant::quantize_nf4(ref.get(key + ".original").to(kGPU), true);
    require_bytes_equal(ours.packed, q.packed);
    auto nested = quant::double_quantize_absmax(quant::quantize_nf4(ref.get(key + ".original").to(kGPU), false).absmax,
                                                q.offset);
    require_bytes_equal(nested.codes, q.absmax);
    require_bytes_equal(nested.nested_absmax, q.nested_absmax);
  }
  REQUIRE(linears == 14);
}

TEST_CASE("cuda nf4 quantise agrees with the CPU up to the reciprocal's last bit", "[cuda][nf4]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 300;
  for (const Shape& s : std::vector<Shape>{{1}, {63}, {129}, {17, 300}, {1000, 999}, {2, 4096, 33}}) {
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      for (int64_t bs : {int64_t{64}, int64_t{256}}) {
        ++seed;
        Tensor w = random_tensor(s, dt, seed, seed % 2 == 0);
        quant::NF4Weight c = quant::quantize_nf4(w, true, bs), g = quant::quantize_nf4(w.to(kGPU), true, bs);
        quant::NF4Weight cs = quant::quantize_nf4(w, false, bs), gs = quant::quantize_nf4(w.to(kGPU), false, bs);
        require_bytes_equal(gs.absmax, cs.absmax);
        require_packed_match(w, cs.absmax, c.packed, g.packed, bs);
        REQUIRE(g.offset == c.offset);  // both sum in f64
        require_bytes_equal(g.nested_absmax, c.nested_absmax);
        require_codes_match(cs.absmax, c.offset, c.nested_absmax, c.absmax, g.absmax, c.nested_code);
      }
    }
  }
}

TEST_CASE("cuda nf4 one-kernel dequantise equals the CPU for any size, dtype and alignment", "[cuda][nf4]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 500;
  for (const Shape& s : std::vector<Shape>{{1}, {2}, {31}, {32}, {33}, {64}, {65}, {7, 100}, {129, 257}, {3, 1000, 70}}) {
    for (bool dq : {true, false}) {
      for (int64_t bs : {int64_t{64}, int64_t{128}, int64_t{4096}}) {
        quant::NF4Weight q = quant::quantize_nf4(random_tensor(s, DType::bf16, ++seed), dq, bs);
        quant::NF4Weight g = quant::to_device(q, kGPU);
        // the same bytes at an odd address: the kernel's scalar path
        Tensor shifted = zeros({q.packed.numel() + 1}, DType::u8, kGPU);
        copy_(shifted.narrow(0, 1, q.packed.numel()), g.packed);
        quant::NF4Weight odd = g;
        odd.packed = shifted.narrow(0, 1, q.packed.numel());
        for (DType out : {DType::bf16, DType::f16, DType::f32}) {
          INFO("numel " << q.numel() << " dq " << dq << " bs " << bs << " out " << dtype_name(out));
          const Tensor want = quant::dequantize_nf4(q, out);
          test::OpCounter ops;
          const Tensor got = quant::dequantize_nf4(g, out);
          REQUIRE(ops.names == std::vector<std::string>{"nf4_dequantize"});  // one op, one kernel
          require_bytes_equal(got, want);
          require_bytes_equal(quant::dequantize_nf4(odd, out), want);
        }
      }
    }
  }
}

TEST_CASE("cuda nf4 linear: CPU agreement, gradients, and no dequantised weight kept", "[cuda][nf4]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  quant::NF4Weight q = quant::quantize_nf4(random_tensor({96, 200}, DType::bf16, 71));
  quant::NF4Weight g = quant::to_device(q, kGPU);
  Tensor x = random_tensor({3, 7, 200}, DType::f32, 72);
  Tensor bias = random_tensor({96}, DType::f32, 73);
  Tensor r = random_tensor({3, 7, 96}, DType::f32, 74);
  Tensor xc = x.detach().set_requires_grad(), bc = bias.detach().set_requires_grad();
  Tensor xg = x.to(kGPU).set_requires_grad(), bg = bias.to(kGPU).set_requires_grad();
  Tensor yc = quant::nf4_linear(xc, q, bc), yg = quant::nf4_linear(xg, g, bg);
  test::require_close(yg.to(kCPU), yc, 1e-4, 1e-4);
  sum(yc * r).backward();
  sum(yg * r.to(kGPU)).backward();
  test::require_close(xg.grad().to(kCPU), xc.grad(), 1e-4, 1e-4);
  test::require_close(bg.grad().to(kCPU), bc.grad(), 1e-4, 1e-4);

  // memory: forward keeps only its output alive (the (N, K) bf16 weight is freed at once)
  quant::NF4Weight big = quant::quantize_nf4(random_tensor({2048, 1024}, DType::bf16, 75).to(kGPU));
  Tensor xb = random_tensor({256, 1024}, DType::bf16, 76).to(kGPU).set_requires_grad();
  { Tensor warm = quant::nf4_linear(xb.detach(), big); }  // cuBLASLt plans and workspaces for these shapes
  cuda::synchronize();
  const size_t before = cuda::memory_stats().allocated;
  Tensor yb = quant::nf4_linear(xb, big);
  cuda::synchronize();
  const size_t after = cuda::memory_stats().allocated;
  const size_t weight_bytes = 2048 * 1024 * 2, out_bytes = 256 * 2048 * 2;
  INFO("allocated grew by " << (after - before) << " bytes; output " << out_bytes << ", weight " << weight_bytes);
  REQUIRE(after - before < out_bytes + weight_bytes / 4);
  sum(yb).backward();
  REQUIRE(xb.grad().shape() == xb.shape());
}

}  // namespace
}  // namespace kiln

// Core layer tests: dtypes and half-precision conversions, devices, storage views, Philox
// known-answer vectors, host copies, printing, the dispatch observer, device-mixing errors and JSON integers.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/cuda/runtime.h"
#include "core/json_int.h"
#include "core/philox.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

TEST_CASE("dtype sizes, names and parsing", "[core]") {
  REQUIRE(itemsize(DType::f64) == 8);
  REQUIRE(itemsize(DType::bf16) == 2);
  REQUIRE(itemsize(DType::boolean) == 1);
  REQUIRE(std::string(dtype_name(DType::f16)) == "f16");
  REQUIRE(parse_dtype("bfloat16") == DType::bf16);
  REQUIRE(parse_dtype("i32") == DType::i32);
  REQUIRE_THROWS_WITH(parse_dtype("float8"), ContainsSubstring("[dtype] unknown dtype 'float8'"));
  REQUIRE(is_floating(DType::f16));
  REQUIRE_FALSE(is_floating(DType::i64));
}

TEST_CASE("bf16 and f16 round to nearest even and keep specials", "[core]") {
  // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> even (1); slightly above rounds up.
  REQUIRE(float(bf16(1.0f + 0x1p-8f)) == 1.0f);
  REQUIRE(float(bf16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f);
  REQUIRE(std::isnan(float(bf16(NAN))));
  REQUIRE(float(bf16(-INFINITY)) == -INFINITY);
  // f16: exhaustive round trip of every finite half value, and rounding of midpoints.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    f16 h;
    h.bits = static_cast<uint16_t>(bits);
    float f = float(h);
    if (std::isnan(f)) { REQUIRE(std::isnan(float(f16(f)))); continue; }
    REQUIRE(f16(f).bits == h.bits);
  }
  REQUIRE(float(f16(65504.0f)) == 65504.0f);
  REQUIRE(std::isinf(float(f16(65520.0f))));
  REQUIRE(float(f16(1.0f + 0x1p-11f)) == 1.0f);                 // halfway -> even
  REQUIRE(float(f16(1.0f + 0x1p-11f + 0x1p-20f)) == 1.0f + 0x1p-10f);
  REQUIRE(float(f16(0x1p-25f)) == 0.0f);                         // halfway to the smallest subnormal -> 0
  REQUIRE(float(f16(0x1p-25f + 0x1p-30f)) == 0x1p-24f);
  REQUIRE(float(f16(3.0f * 0x1p-25f)) == 0x1p-23f);              // 1.5 subnormal units -> 2 (even)
}

TEST_CASE("devices parse and print", "[core]") {
  REQUIRE(Device("cpu").is_cpu());
  REQUIRE(Device("cuda:3").index == 3);
  REQUIRE(Device("cuda").str() == "cuda:0");
  REQUIRE_THROWS_WITH(Device("gpu0"), ContainsSubstring("[device] cannot parse device 'gpu0'"));
  REQUIRE_THROWS_AS(Device("cuda:x"), Error);
  REQUIRE_THROWS_AS(Device("cuda:-1"), Error);
  REQUIRE(cuda::device_count() >= 0);
}

TEST_CASE("Philox 4x32-10 matches the Random123 known-answer vectors", "[core][random]") {
  philox::Block z = philox::philox4x32(0, 0, 0);
  REQUIRE(z.w[0] == 0x6627e8d5u);
  REQUIRE(z.w[1] == 0xe169c58du);
  REQUIRE(z.w[2] == 0xbc57ac4cu);
  REQUIRE(z.w[3] == 0x9b00dbd8u);
  philox::Block f = philox::philox4x32(~0ull, ~0ull, ~0ull);
  REQUIRE(f.w[0] == 0x408f276du);
  REQUIRE(f.w[1] == 0x41c83b0eu);
  REQUIRE(f.w[2] == 0xa20bc7c6u);
  REQUIRE(f.w[3] == 0x6d5451fdu);
  philox::Block pi = philox::philox4x32(0x85a308d3243f6a88ull, 0x0370734413198a2eull, 0x299f31d0a4093822ull);
  REQUIRE(pi.w[0] == 0xd16cfe09u);
  REQUIRE(pi.w[1] == 0x94fdccebu);
  REQUIRE(pi.w[2] == 0x5001e420u);
  REQUIRE(pi.w[3] == 0x24126ea1u);
}

TEST_CASE("host copies round-trip every dtype", "[core]") {
  REQUIRE(from_vector<double>({1.5, -2.25}, {2}).to_vector<double>() == std::vector<double>{1.5, -2.25});
  REQUIRE(from_vector<int32_t>({1, 2, 3, 4, 5, 6}, {2, 3}).shape() == Shape{2, 3});
  REQUIRE(from_vector<int64_t>({7}, {}).item<int64_t>() == 7);
  REQUIRE(from_vector<bool>({true, false, true}, {3}).to_vector<bool>() == std::vector<bool>{true, false, true});
  REQUIRE(from_vector<uint8_t>({255}, {1}).item<int64_t>() == 255);
  Tensor h = from_vector<bf16>({bf16(1.5f), bf16(-3.0f)}, {2});
  REQUIRE(cast(h, DType::f32).to_vector<float>() == std::vector<float>{1.5f, -3.0f});
  REQUIRE_THROWS_WITH(h.item<float>(), ContainsSubstring("[item]"));
  REQUIRE_THROWS_WITH(h.to_vector<float>(), ContainsSubstring("[to_vector] tensor has dtype bf16, asked for f32"));
  REQUIRE_THROWS_WITH(from_vector<float>({1, 2, 3}, {2, 2}), ContainsSubstring("[from_vector] 3 values cannot fill shape (2, 2)"));
}

TEST_CASE("from_blob views outside memory and keeps its owner alive", "[core]") {
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4, 5, 6});
  std::weak_ptr<std::vector<float>> watch = owner;
  Tensor t = from_blob(owner->data(), {2, 3}, DType::f32, kCPU, owner);
  owner.reset();
  REQUIRE_FALSE(watch.expired());
  Tensor col = t.select(1, 2);  // a strided view of the blob
  REQUIRE(col.to_vector<float>() == std::vector<float>{3, 6});
  (*watch.lock())[2] = 30;  // writes through to the view
  REQUIRE(col.to_vector<float>() == std::vector<float>{30, 6});
  t = Tensor();
  REQUIRE_FALSE(watch.expired());  // the view still holds the storage
  col = Tensor();
  REQUIRE(watch.expired());
}

TEST_CASE("in-place writes bump the storage version", "[core]") {
  Tensor t = zeros({3});
  uint64_t v = t.storage()->version();
  t.fill_(2.0);
  REQUIRE(t.storage()->version() == v + 1);
  t.copy_(ones({3}));
  REQUIRE(t.storage()->version() == v + 2);
  REQUIRE(t.to_vector<float>() == std::vector<float>{1, 1, 1});
}

TEST_CASE("tensors print readably", "[core]") {
  Tensor a = from_vector<float>({1.0f, -2.5f, 3.25f, 4.0f}, {2, 2});
  REQUIRE(a.to_string() == "tensor([[ 1.0000, -2.5000],\n        [ 3.2500,  4.0000]], shape=(2, 2), dtype=f32)");
  REQUIRE(from_vector<int64_t>({3, -10}, {2}).to_string() == "tensor([  3, -10], shape=(2,), dtype=i64)");
  REQUIRE(from_vector<bool>({true, false}, {2}).to_string() == "tensor([ true, false], shape=(2,), dtype=bool)");
  REQUIRE(scalar_tensor(1e-7, DType::f64).to_string() == "tensor(1.0000e-07, shape=(), dtype=f64)");
  std::string big = arange(5000, DType::f32).reshape({50, 100}).to_string();
  REQUIRE_THAT(big, ContainsSubstring("..."));
  REQUIRE(big.size() < 800);
  Tensor g = randn({2}).set_requires_grad();
  REQUIRE_THAT(g.to_string(), ContainsSubstring("requires_grad"));
  REQUIRE(zeros({0, 3}).to_string() == "tensor([], shape=(0, 3), dtype=f32)");
}

TEST_CASE("every op passes through the dispatch observer", "[core]") {
  test::OpCounter counter;
  Tensor a = randn({4, 3});
  Tensor b = a.transpose(0, 1).contiguous();
  REQUIRE(counter.count("random") == 1);
  REQUIRE(counter.count("permute") == 1);
  REQUIRE(counter.count("copy") == 1);
  REQUIRE(b.shape() == Shape{3, 4});
}

TEST_CASE("generators replay from a saved state", "[core][random]") {
  Generator g(1234);
  GeneratorState s = g.state();
  Tensor a = randn({100}, DType::f32, kCPU, &g);
  Tensor b = randn({100}, DType::f32, kCPU, &g);
  REQUIRE_FALSE(test::all_close(a, b));
  g.set_state(s);
  test::require_equal(randn({100}, DType::f32, kCPU, &g), a);
  Generator other(1234);
  test::require_equal(randn({100}, DType::f32, kCPU, &other), a);
  Generator seed2(1235);
  REQUIRE_FALSE(test::all_close(randn({100}, DType::f32, kCPU, &seed2), a));
}

TEST_CASE("ops reject tensors on different devices before running", "[core]") {
  std::vector<float> host(6, 1.0f);
  Tensor fake_gpu = from_blob(host.data(), {2, 3}, DType::f32, Device("cuda:0"));
  Tensor cpu = ones({2, 3});
  REQUIRE_THROWS_WITH(add(cpu, fake_gpu), ContainsSubstring("expected all tensors on one device, found cpu (input 0) and cuda:0"));
  REQUIRE_THROWS_WITH(cat({cpu, fake_gpu}, 0), ContainsSubstring("[cat]"));
  if (!cuda::is_available()) {
    REQUIRE_THROWS_AS(zeros({2}, DType::f32, Device("cuda:0")), Error);
  }
}

TEST_CASE("JSON integers from outside: only integers in range, never a float converted", "[core]") {
  using nlohmann::json;
  REQUIRE(json_int(json::parse("-9223372036854775808")) == std::numeric_limits<int64_t>::min());
  REQUIRE(json_int(json::parse("9223372036854775807")) == std::numeric_limits<int64_t>::max());
  REQUIRE_FALSE(json_int(json::parse("9223372036854775808")));  // an unsigned beyond int64
  REQUIRE_FALSE(json_int(json::parse("-1.1e59")));
  REQUIRE_FALSE(json_int(json::parse("4.0")));  // a float, even a whole one
  REQUIRE_FALSE(json_int(json::parse("\"7\"")));
  REQUIRE_FALSE(json_int(json::parse("null")));
  REQUIRE(json_int(json::parse("7"), 0, 7) == 7);
  REQUIRE_FALSE(json_int(json::parse("8"), 0, 7));
  REQUIRE_FALSE(json_int(json::parse("-1"), 0, 7));
  REQUIRE(json_uint(json::parse("18446744073709551615")) == std::numeric_limits<uint64_t>::max());
  REQUIRE_FALSE(json_uint(json::parse("-1")));
  REQUIRE_FALSE(json_uint(json::parse("1e3")));
  REQUIRE(json_shown(json::parse("[1, 2]")) == "array");
  REQUIRE(json_shown(json::parse("2.5")) == "2.5");
}

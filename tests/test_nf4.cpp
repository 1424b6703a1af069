// NF4 (quant/): tables, CPU quantise/dequantise against in-test references and against real
// bitsandbytes output (tests/data/nf4, made by tools/make_nf4_fixtures.py with bnb's CUDA kernels),
// the bnb-4bit checkpoint io of a tiny Llama, the NF4 linear op and its gradient, and bad input.
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "quant/bnb_checkpoint.h"
#include "quant/nf4.h"
#include "tests/helpers.h"
#include "tests/nf4_fixtures.h"

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;

namespace kiln::test::nf4 {

// The fixture folder tests/data/nf4 (tests/helpers.h says where it is looked for).
fs::path fixtures() {
  const fs::path dir = test_data("nf4");
  if (!fs::exists(dir / "blockwise.safetensors")) FAIL("nf4 fixtures not found (tools/make_nf4_fixtures.py writes tests/data/nf4)");
  return dir;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  Tensor c = contiguous(t.to(kCPU));
  std::vector<uint8_t> out(c.nbytes());
  if (!out.empty()) std::memcpy(out.data(), c.raw_data(), out.size());
  return out;
}

void require_bytes_equal(const Tensor& a, const Tensor& b) {
  REQUIRE(a.dtype() == b.dtype());
  REQUIRE(a.numel() == b.numel());
  const auto va = bytes_of(a), vb = bytes_of(b);
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < va.size(); ++i)
    if (va[i] != vb[i] && bad++ == 0) first = i;
  const size_t elem = first / itemsize(a.dtype());
  INFO("first differing byte " << first << " of " << va.size() << " (" << bad << " bytes differ), element " << elem
                               << ": " << (bad ? a.reshape({-1}).to(DType::f64).to_vector<double>()[elem] : 0.0) << " vs "
                               << (bad ? b.reshape({-1}).to(DType::f64).to_vector<double>()[elem] : 0.0));
  REQUIRE(bad == 0);
}

// x * (1/absmax) as kiln's CPU quantiser computes it (IEEE reciprocal, flush-to-zero).
float normalised(float w, float absmax) {
  auto ftz = [](float v) { return std::fabs(v) < FLT_MIN ? 0.0f : v; };
  return ftz(ftz(w) * (1.0f / absmax));
}

// Codes a (kiln) and b (bnb's CUDA kernel, approximate reciprocal) may differ only where x lies
// within a few ulps of the boundary `mid` between them.
bool near_boundary(float x, float mid) {
  return std::fabs(x - mid) <= 4.0f * (std::nextafter(std::fabs(mid), FLT_MAX) - std::fabs(mid)) + FLT_MIN;
}

// Packed NF4 bytes of the CPU quantiser vs bnb's CUDA bytes: equal except near a midpoint.
void require_packed_match(const Tensor& w, const Tensor& absmax_f32, const Tensor& ours, const Tensor& theirs,
                          int64_t blocksize) {
  const auto a = bytes_of(ours), b = bytes_of(theirs);
  REQUIRE(a.size() == b.size());
  const std::vector<float> wv = w.to(DType::f32).reshape({-1}).to_vector<float>();
  const std::vector<float> am = absmax_f32.to_vector<float>();
  int64_t diffs = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    for (int half = 0; half < 2; ++half) {
      const int ca = half ? a[i] & 15 : a[i] >> 4, cb = half ? b[i] & 15 : b[i] >> 4;
      if (ca == cb) continue;
      ++diffs;
      const size_t e = 2 * i + static_cast<size_t>(half);
      REQUIRE(e < wv.size());
      REQUIRE(std::abs(ca - cb) == 1);
      const float x = normalised(wv[e], am[e / static_cast<size_t>(blocksize)]);
      INFO("element " << e << " x " << x << " codes " << ca << " vs " << cb);
      REQUIRE(near_boundary(x, quant::nf4_midpoints()[static_cast<size_t>(std::min(ca, cb))]));
    }
  }
  REQUIRE(diffs * 10000 <= static_cast<int64_t>(wv.size()) + 10000);  // at most ~1e-4 of the codes
}

// 8-bit absmax codes of the CPU quantiser vs bnb's: equal except near a midpoint of the code.
void require_codes_match(const Tensor& absmax_f32, float offset, const Tensor& nested, const Tensor& ours,
                         const Tensor& theirs, const Tensor& code) {
  const auto a = bytes_of(ours), b = bytes_of(theirs);
  REQUIRE(a.size() == b.size());
  const std::vector<float> am = absmax_f32.to_vector<float>(), ns = nested.to_vector<float>(),
                           cv = code.to_vector<float>();
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    REQUIRE(std::abs(a[i] - b[i]) == 1);
    const float x = normalised(am[i] - offset, ns[i / 256]);
    const size_t lo = std::min(a[i], b[i]);
    INFO("absmax code " << i << ": " << int(a[i]) << " vs " << int(b[i]) << " x " << x);
    REQUIRE(near_boundary(x, (cv[lo] + cv[lo + 1]) * 0.5f));
  }
}

// Builds the NF4Weight bnb wrote for fixture case `p` ("caseN.") of blockwise.safetensors.
quant::NF4Weight fixture_weight(const io::SafetensorsFile& f, const std::string& p) {
  quant::NF4Weight q;
  const Tensor w = f.get(p + "w");
  q.shape = w.shape();
  q.dtype = w.dtype();
  q.packed = f.get(p + "packed");
  q.absmax = f.get(p + "absmax");
  q.double_quant = f.contains(p + "nested_absmax");
  if (q.double_quant) {
    q.nested_absmax = f.get(p + "nested_absmax");
    q.nested_code = f.get(p + "nested_code");
    q.offset = f.get(p + "offset").item<float>();
  }
  return q;
}

std::vector<std::string> fixture_cases(const io::SafetensorsFile& f) {
  std::vector<std::string> out;
  for (int i = 0; f.contains("case" + std::to_string(i) + ".w"); ++i) out.push_back("case" + std::to_string(i) + ".");
  return out;
}

}  // namespace kiln::test::nf4

namespace kiln {
namespace {

using namespace test::nf4;
using test::random_tensor;

// The dequantised value of element i, computed from the format's rules (independent of quant/).
double reference_value(const quant::NF4Weight& q, const std::vector<uint8_t>& packed, const std::vector<float>& scales,
                       int64_t i) {
  const uint8_t byte = packed[static_cast<size_t>(i / 2)];
  const int code = (i % 2 == 0) ? byte >> 4 : byte & 15;
  return static_cast<double>(quant::nf4_levels()[static_cast<size_t>(code)] * scales[static_cast<size_t>(i / q.blocksize)]);
}

std::vector<float> reference_scales(const quant::NF4Weight& q) {
  if (!q.double_quant) return q.absmax.to_vector<float>();
  const auto codes = q.absmax.to_vector<uint8_t>();
  const auto nested = q.nested_absmax.to_vector<float>(), code = q.nested_code.to_vector<float>();
  std::vector<float> s(codes.size());
  for (size_t b = 0; b < codes.size(); ++b) {
    volatile float prod = code[codes[b]] * nested[b / static_cast<size_t>(q.nested_blocksize)];
    s[b] = prod + q.offset;
  }
  return s;
}

TEST_CASE("nf4 tables: levels, midpoints and bnb's dynamic code", "[nf4]") {
  const auto& lv = quant::nf4_levels();
  const auto& mid = quant::nf4_midpoints();
  for (size_t i = 0; i < 15; ++i) {
    REQUIRE(lv[i] < mid[i]);
    REQUIRE(mid[i] < lv[i + 1]);
  }
  for (size_t i = 0; i < 16; ++i) REQUIRE(quant::nf4_code(lv[i]) == i);
  REQUIRE(quant::nf4_code(std::nanf("")) == 0);
  REQUIRE(quant::nf4_code(2.0f) == 15);
  const auto& code = quant::dynamic_code();
  REQUIRE(code[127] == 0.0f);
  REQUIRE(code[255] == 1.0f);
  for (size_t i = 0; i + 1 < 256; ++i) REQUIRE(code[i] < code[i + 1]);
  for (int i = 0; i < 256; ++i) REQUIRE(quant::dynamic_code_index(code.data(), code[static_cast<size_t>(i)]) == i);
  // bnb's own tables, saved by the fixture script
  auto f = io::SafetensorsFile::open((fixtures() / "blockwise.safetensors").string());
  require_bytes_equal(quant::nf4_levels_tensor(), f.get("nf4_code"));
  require_bytes_equal(quant::dynamic_code_tensor(), f.get("dynamic_code"));
}

TEST_CASE("nf4 quantise picks the nearest level and dequantise follows the format", "[nf4]") {
  const std::vector<Shape> shapes = {{1}, {3}, {64}, {65}, {7, 9}, {33, 64}, {5, 129}, {300, 257}, {2, 3, 71}};
  uint64_t seed = 10;
  for (const Shape& s : shapes) {
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      for (bool dq : {true, false}) {
        ++seed;
        Tensor w = random_tensor(s, dt, seed, seed % 3 == 0);
        quant::NF4Weight q = quant::quantize_nf4(w, dq);
        INFO("shape (" << fmt::format("{}", fmt::join(s, ", ")) << ") dtype " << dtype_name(dt) << " dq " << dq);
        REQUIRE(q.shape == s);
        REQUIRE(q.packed.numel() == (w.numel() + 1) / 2);
        // nearest level for every element, from the exact f32 absmax
        quant::NF4Weight single = quant::quantize_nf4(w, false);
        require_bytes_equal(single.packed, q.packed);
        const auto wv = contiguous(w).to(DType::f32).reshape({-1}).to_vector<float>();
        const auto am = single.absmax.to_vector<float>();
        const auto pk = q.packed.to_vector<uint8_t>();
        for (int64_t i = 0; i < w.numel(); ++i) {
          const float x = normalised(wv[static_cast<size_t>(i)], am[static_cast<size_t>(i / 64)]);
          const int c = (i % 2 == 0) ? pk[static_cast<size_t>(i / 2)] >> 4 : pk[static_cast<size_t>(i / 2)] & 15;
          for (size_t j = 0; j < 16; ++j)
            REQUIRE(std::fabs(x - quant::nf4_levels()[static_cast<size_t>(c)]) <=
                    std::fabs(x - quant::nf4_levels()[j]) + 1e-6f);
        }
        if (w.numel() % 2 == 1) REQUIRE((pk.back() & 15) == 7);  // padding quantises 0
        // dequantise in every dtype against the format's rules
        const auto scales = reference_scales(q);
        for (DType out : {DType::f32, DType::bf16, DType::f16}) {
          Tensor d = quant::dequantize_nf4(q, out);
          REQUIRE(d.shape() == s);
          REQUIRE(d.dtype() == out);
          std::vector<double> want(static_cast<size_t>(w.numel()));
          for (int64_t i = 0; i < w.numel(); ++i) want[static_cast<size_t>(i)] = reference_value(q, pk, scales, i);
          Tensor ref = from_vector(want, s).to(DType::f32).to(out);
          require_bytes_equal(d, ref);
        }
        // the round trip error is at most half the widest level gap times the block's scale
        const auto dv = quant::dequantize_nf4(q, DType::f32).reshape({-1}).to_vector<float>();
        for (int64_t i = 0; i < w.numel(); ++i) {
          const float a = am[static_cast<size_t>(i / 64)], sc = scales[static_cast<size_t>(i / 64)];
          REQUIRE(std::fabs(dv[static_cast<size_t>(i)] - wv[static_cast<size_t>(i)]) <=
                  0.153f * a + std::fabs(sc - a) + 1e-6f);
        }
      }
    }
  }
}

TEST_CASE("nf4 all-zero blocks and absmax round trip", "[nf4]") {
  Tensor w = random_tensor({3, 100}, DType::f32, 77);
  std::vector<float> v = w.reshape({-1}).to_vector<float>();
  for (size_t i = 64; i < 128; ++i) v[i] = 0.0f;  // block 1 is all zeros
  w = from_vector(v, {3, 100});
  quant::NF4Weight q = quant::quantize_nf4(w, false);
  REQUIRE(q.absmax.to_vector<float>()[1] == 0.0f);
  const auto pk = q.packed.to_vector<uint8_t>();
  for (size_t i = 32; i < 64; ++i) REQUIRE(pk[i] == 0);  // bnb: 0 * (1/0) is NaN, which takes code 0
  Tensor d = quant::dequantize_nf4(q, DType::f32);
  for (float x : d.reshape({-1}).slice(0, 64, 128).to_vector<float>()) REQUIRE(x == 0.0f);
  quant::NF4Weight q2 = quant::quantize_nf4(w, true);
  const auto exact = q.absmax.to_vector<float>(), decoded = quant::dequantize_absmax(q2).to_vector<float>();
  const float top = *std::max_element(exact.begin(), exact.end());
  for (size_t b = 0; b < exact.size(); ++b) REQUIRE(std::fabs(decoded[b] - exact[b]) <= 0.01f * top + 1e-6f);
}

TEST_CASE("nf4 CPU quantise and dequantise match bitsandbytes", "[nf4]") {
  auto f = io::SafetensorsFile::open((fixtures() / "blockwise.safetensors").string());
  const auto cases = fixture_cases(f);
  REQUIRE(cases.size() >= 5);
  for (const std::string& p : cases) {
    INFO("fixture " << p);
    const Tensor w = f.get(p + "w");
    const quant::NF4Weight bnb = fixture_weight(f, p);
    quant::NF4Weight ours = quant::quantize_nf4(w, bnb.double_quant);
    require_bytes_equal(quant::quantize_nf4(w, false).absmax, f.get(p + "absmax_f32"));
    require_packed_match(w, f.get(p + "absmax_f32"), ours.packed, bnb.packed);
    if (bnb.double_quant) {
      REQUIRE(std::fabs(ours.offset - bnb.offset) <= 2e-6f * std::fabs(bnb.offset));
      auto nested = quant::double_quantize_absmax(f.get(p + "absmax_f32"), bnb.offset);
      require_bytes_equal(nested.nested_absmax, bnb.nested_absmax);
      require_codes_match(f.get(p + "absmax_f32"), bnb.offset, bnb.nested_absmax, nested.codes, bnb.absmax,
                          bnb.nested_code);
    }
    // dequantising bnb's bytes gives bnb's values bit for bit
    require_bytes_equal(quant::dequantize_nf4(bnb, w.dtype()), f.get(p + "dequant"));
    if (f.contains(p + "dequant_f32")) {
      require_bytes_equal(quant::dequantize_nf4(bnb, DType::f32), f.get(p + "dequant_f32"));
      require_bytes_equal(quant::dequantize_nf4(bnb, DType::bf16), f.get(p + "dequant_bf16"));
    }
  }
}

TEST_CASE("nf4 bnb-4bit checkpoint of a tiny Llama loads bit for bit and saves back", "[nf4]") {
  auto model = io::SafetensorsFile::open((fixtures() / "tiny_llama_bnb4" / "model.safetensors").string());
  auto ref = io::SafetensorsFile::open((fixtures() / "tiny_llama_reference.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> resaved;
  int linears = 0;
  for (const std::string& key : model.keys()) {
    if (!quant::is_bnb_nf4(model, key)) continue;
    ++linears;
    INFO("weight " << key);
    quant::NF4Weight q = quant::read_bnb_nf4(model, key);
    REQUIRE(q.double_quant);
    REQUIRE(q.dtype == DType::bf16);
    const Tensor original = ref.get(key + ".original");
    REQUIRE(q.shape == original.shape());
    require_bytes_equal(quant::dequantize_nf4(q, DType::bf16), ref.get(key + ".dequant"));
    // quantising the bf16 original reproduces the file
    quant::NF4Weight ours = quant::quantize_nf4(original, true);
    quant::NF4Weight single = quant::quantize_nf4(original, false);
    require_packed_match(original, single.absmax, ours.packed, q.packed);
    REQUIRE(std::fabs(ours.offset - q.offset) <= 2e-6f * std::fabs(q.offset));
    auto nested = quant::double_quantize_absmax(single.absmax, q.offset);
    require_bytes_equal(nested.nested_absmax, q.nested_absmax);
    require_codes_match(single.absmax, q.offset, q.nested_absmax, nested.codes, q.absmax, q.nested_code);
    // the tensors kiln writes are the file's, byte for byte (JSON included)
    for (auto& [k, t] : quant::bnb_nf4_tensors(key, q)) {
      INFO("entry " << k);
      REQUIRE(model.contains(k));
      REQUIRE(model.info(k).shape == t.shape());
      require_bytes_equal(t, model.get(k));
      resaved.emplace_back(k, t);
    }
  }
  REQUIRE(linears == 14);  // 2 layers x (q, k, v, o, gate, up, down)
  const fs::path tmp = fs::temp_directory_path() / "kiln_nf4_resave.safetensors";
  io::save_safetensors(tmp.string(), resaved);
  auto back = io::SafetensorsFile::open(tmp.string());
  for (const auto& [k, t] : resaved) {
    if (k.size() > 7 && k.compare(k.size() - 7, 7, ".weight") == 0) {
      require_bytes_equal(quant::dequantize_nf4(quant::read_bnb_nf4(back, k)), ref.get(k + ".dequant"));
    }
  }
  fs::remove(tmp);
}

TEST_CASE("nf4 checkpoint io rejects inconsistent entries, naming the key", "[nf4]") {
  quant::NF4Weight q = quant::quantize_nf4(random_tensor({8, 70}, DType::bf16, 5));
  auto entries = quant::bnb_nf4_tensors("m.w.weight", q);
  REQUIRE(quant::read_bnb_nf4(entries, "m.w.weight").offset == q.offset);
  auto replace = [&](const std::string& key, Tensor t) {
    auto e = entries;
    for (auto& [k, v] : e)
      if (k == key) v = std::move(t);
    return e;
  };
  REQUIRE_THROWS_WITH(quant::read_bnb_nf4(replace("m.w.weight.absmax", zeros({3}, DType::u8)), "m.w.weight"),
                      ContainsSubstring("[bnb_nf4]") && ContainsSubstring("m.w.weight.absmax"));
  REQUIRE_THROWS_WITH(quant::read_bnb_nf4(replace("m.w.weight", zeros({5, 1}, DType::u8)), "m.w.weight"),
                      ContainsSubstring("[bnb_nf4]") && ContainsSubstring("m.w.weight"));
  REQUIRE_THROWS_WITH(quant::read_bnb_nf4(replace("m.w.weight.quant_map", zeros({16})), "m.w.weight"),
                      ContainsSubstring("m.w.weight.quant_map"));
  const std::string bad = R"({"quant_type": "fp4", "blocksize": 64})";
  REQUIRE_THROWS_WITH(
      quant::read_bnb_nf4(replace("m.w.weight.quant_state.bitsandbytes__nf4",
                                  from_vector(std::vector<uint8_t>(bad.begin(), bad.end()), {int64_t(bad.size())})),
                          "m.w.weight"),
      ContainsSubstring("quant_type"));
  REQUIRE_THROWS_WITH(quant::read_bnb_nf4(entries, "other.weight"), ContainsSubstring("other.weight"));
  REQUIRE_THROWS_WITH(quant::quantize_nf4(zeros({4}, DType::i64)), ContainsSubstring("[nf4_quantize]"));
  Tensor w64 = random_tensor({3, 50}, DType::f64, 6);  // f64 quantises as its f32 rounding
  require_bytes_equal(quant::quantize_nf4(w64).packed, quant::quantize_nf4(cast(w64, DType::f32)).packed);
  REQUIRE_THROWS_WITH(quant::quantize_nf4(random_tensor({128}, DType::f32, 1), true, 100),
                      ContainsSubstring("[nf4_quantize]"));
  quant::NF4Weight broken = q;
  broken.nested_absmax = zeros({7});
  REQUIRE_THROWS_WITH(quant::dequantize_nf4(broken), ContainsSubstring("[nf4_dequantize]"));
  REQUIRE_THROWS_WITH(quant::dequantize_nf4(q, DType::i32), ContainsSubstring("[nf4_dequantize]"));
  REQUIRE_THROWS_WITH(quant::nf4_linear(random_tensor({2, 69}, DType::bf16, 2), q), ContainsSubstring("[nf4_linear]"));
  REQUIRE_THROWS_WITH(quant::nf4_linear(random_tensor({2, 70}, DType::bf16, 2), q, zeros({7}, DType::bf16)),
                      ContainsSubstring("[nf4_linear]"));
}

TEST_CASE("nf4 linear: forward, input and bias gradients, weight dequantised again in backward", "[nf4]") {
  for (DType dt : {DType::f32, DType::bf16}) {
    quant::NF4Weight q = quant::quantize_nf4(random_tensor({24, 70}, DType::bf16, 31));
    Tensor wd = quant::dequantize_nf4(q, dt);  // (24, 70)
    Tensor x = random_tensor({2, 5, 70}, dt, 32, true).set_requires_grad();
    Tensor bias = random_tensor({24}, dt, 33).set_requires_grad();
    Tensor r = random_tensor({2, 5, 24}, dt, 34);
    test::OpCounter ops;
    Tensor y = quant::nf4_linear(x, q, bias);
    REQUIRE(ops.count("nf4_dequantize") == 1);
    REQUIRE(y.shape() == Shape{2, 5, 24});
    REQUIRE(y.dtype() == dt);
    sum(y * r).backward();
    REQUIRE(ops.count("nf4_dequantize") == 2);  // backward dequantised again: nothing was kept
    // the same computation through plain ops on the dequantised weight
    Tensor x2 = x.detach().set_requires_grad(), b2 = bias.detach().set_requires_grad();
    Tensor y2 = add(matmul(x2, wd.t()), b2);
    sum(y2 * r).backward();
    const double tol = dt == DType::f32 ? 1e-5 : 2e-2;
    test::require_close(y, y2, tol, tol);
    test::require_close(x.grad(), x2.grad(), tol, tol);
    test::require_close(bias.grad(), b2.grad(), tol, tol);
  }
  // finite differences through an f64 wrapper (the op runs in f32)
  quant::NF4Weight q = quant::quantize_nf4(random_tensor({6, 65}, DType::f32, 40));
  test::check_gradients(
      [&](const std::vector<Tensor>& in) { return cast(quant::nf4_linear(cast(in[0], DType::f32), q), DType::f64); },
      {random_tensor({3, 65}, DType::f64, 41).set_requires_grad()}, 0.1, 1e-3, 1e-3);
}

}  // namespace
}  // namespace kiln

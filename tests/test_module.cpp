// nn::Module (registration, traversal, to(), train/eval, state dicts), the basic layers (Linear,
// Embedding, RMSNorm, llama3 rotary frequencies) and LlamaConfig parsing.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>
#include <numbers>

#include "nn/layers.h"
#include "nn/llama.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

struct Block : nn::Module {
  Block() {
    register_module("fc", std::make_shared<nn::Linear>(5, 3, true));
    register_module("norm", std::make_shared<nn::RMSNorm>(3, 1e-6));
    register_buffer("table", test::random_tensor({2, 2}, DType::f32, 9));
    register_buffer("scratch", zeros({4}), /*persistent=*/false);
  }
  std::string type_name() const override { return "Block"; }
};

struct Net : nn::Module {
  Net() {
    auto list = register_module("blocks", std::make_shared<nn::ModuleList>());
    list->push_back(std::make_shared<Block>());
    list->push_back(std::make_shared<Block>());
    register_parameter("scale", test::random_tensor({3}, DType::f32, 4));
  }
};

}  // namespace

TEST_CASE("module: registration and traversal by dotted names", "[module]") {
  Net net;
  std::vector<std::string> names;
  for (auto& [n, t] : net.named_parameters()) names.push_back(n);
  REQUIRE(names == std::vector<std::string>{"scale", "blocks.0.fc.weight", "blocks.0.fc.bias", "blocks.0.norm.weight",
                                            "blocks.1.fc.weight", "blocks.1.fc.bias", "blocks.1.norm.weight"});
  REQUIRE(net.num_parameters() == 3 + 2 * (15 + 3 + 3));
  std::vector<std::string> mods;
  for (auto& [n, m] : net.named_modules()) mods.push_back(n + ":" + m->type_name());
  REQUIRE(mods == std::vector<std::string>{":Module", "blocks:ModuleList", "blocks.0:Block", "blocks.0.fc:Linear",
                                           "blocks.0.norm:RMSNorm", "blocks.1:Block", "blocks.1.fc:Linear",
                                           "blocks.1.norm:RMSNorm"});
  REQUIRE(net.named_buffers().size() == 4);    // table + scratch, twice
  REQUIRE(net.state_dict().size() == 7 + 2);  // the non-persistent scratch stays out
  REQUIRE(net.find_module("blocks.1.fc")->type_name() == "Linear");
  REQUIRE_THROWS_WITH(net.find_module("blocks.7"), ContainsSubstring("no child module '7'"));
  REQUIRE_THROWS_WITH(net.register_parameter("scale", ones({1})), ContainsSubstring("already registered"));
  REQUIRE_THROWS_WITH(net.register_parameter("a.b", ones({1})), ContainsSubstring("contain no '.'"));
  REQUIRE_THROWS_WITH(net.child_as<nn::Linear>("blocks"), ContainsSubstring("ModuleList"));

  // trainable_parameters follows requires_grad; train/eval reach every module.
  net.child_as<nn::ModuleList>("blocks").at<Block>(0).requires_grad_(false);
  REQUIRE(net.named_trainable_parameters().size() == 4);
  net.eval();
  for (auto& [n, m] : net.named_modules()) REQUIRE_FALSE(m->is_training());
  net.train();
  REQUIRE(net.find_module("blocks.0.norm")->is_training());
}

TEST_CASE("module: to(dtype) converts in place and keeps every handle valid", "[module]") {
  Net net;
  Tensor w = net.find_module("blocks.0.fc")->parameter("weight");
  const std::vector<float> before = w.to_vector<float>();
  net.to(DType::f64);
  REQUIRE(w.dtype() == DType::f64);  // the same handle sees the new data
  REQUIRE(w.requires_grad());
  const std::vector<double> after = w.to_vector<double>();
  for (size_t i = 0; i < before.size(); ++i) REQUIRE(after[i] == static_cast<double>(before[i]));
  net.to(kCPU, DType::bf16);
  REQUIRE(net.find_module("blocks.0")->buffer("table").dtype() == DType::bf16);
  REQUIRE(net.parameter("scale").dtype() == DType::bf16);
}

TEST_CASE("module: state_dict round trip, strict and non-strict loads, nothing lost on error", "[module]") {
  Net a, b;
  nn::StateDict sa = a.state_dict();
  b.load_state_dict(sa);
  for (auto& [n, t] : b.state_dict()) test::require_equal(t, sa.at(n));

  Net c;
  nn::StateDict partial = a.state_dict();
  partial.erase("scale");
  partial.emplace("extra.weight", ones({2}));
  REQUIRE_THROWS_WITH(c.load_state_dict(partial), ContainsSubstring("missing keys: scale"));
  nn::StateDict p2 = a.state_dict();
  p2.emplace("extra.weight", ones({2}));
  REQUIRE_THROWS_WITH(c.load_state_dict(p2), ContainsSubstring("unexpected keys: extra.weight"));
  nn::LoadResult r = c.load_state_dict(partial, /*strict=*/false);
  REQUIRE(r.missing_keys == std::vector<std::string>{"scale"});
  REQUIRE(r.unexpected_keys == std::vector<std::string>{"extra.weight"});

  // A mis-shaped key fails before anything is copied.
  Net d;
  const nn::StateDict d_before = [&] {
    nn::StateDict s;
    for (auto& [n, t] : d.state_dict()) s.emplace(n, t.clone());
    return s;
  }();
  nn::StateDict bad = a.state_dict();
  bad["blocks.1.fc.weight"] = ones({2, 5});
  REQUIRE_THROWS_WITH(d.load_state_dict(bad), ContainsSubstring("blocks.1.fc.weight") && ContainsSubstring("(3, 5)"));
  for (auto& [n, t] : d.state_dict()) test::require_equal(t, d_before.at(n));
  // dtype conversion on load
  Net e;
  e.to(DType::f64);
  e.load_state_dict(a.state_dict());
  test::require_close(cast(e.parameter("scale"), DType::f32), a.parameter("scale"), 0, 0);
}

TEST_CASE("layers: Linear, Embedding and RMSNorm against references, gradients in f64", "[module]") {
  nn::Linear lin(7, 4, true, DType::f64);
  Tensor x = test::random_tensor({2, 3, 7}, DType::f64, 11);
  Tensor y = lin.forward(x);
  REQUIRE(y.shape() == Shape{2, 3, 4});
  auto xv = x.to_vector<double>(), wv = lin.weight().to_vector<double>(), bv = lin.bias().to_vector<double>();
  auto yv = y.to_vector<double>();
  for (int r = 0; r < 6; ++r)
    for (int o = 0; o < 4; ++o) {
      double s = bv[o];
      for (int i = 0; i < 7; ++i) s += xv[r * 7 + i] * wv[o * 7 + i];
      REQUIRE(std::abs(yv[r * 4 + o] - s) < 1e-12);
    }
  // torch's default init bound 1/sqrt(in)
  for (double w : wv) REQUIRE(std::abs(w) <= 1.0 / std::sqrt(7.0));
  test::check_gradients([&](const std::vector<Tensor>& in) { return lin.forward(in[0]); },
                        {test::random_tensor({3, 7}, DType::f64, 12).set_requires_grad()});
  REQUIRE_THROWS_WITH(lin.forward(ones({2, 6}, DType::f64)), ContainsSubstring("[Linear]"));

  nn::Embedding emb(10, 4);
  Tensor ids = from_vector<int64_t>({3, 0, 9}, {3});
  Tensor rows = emb.forward(ids);
  test::require_equal(select(rows, 0, 0), select(emb.weight(), 0, 3));
  test::require_equal(select(rows, 0, 2), select(emb.weight(), 0, 9));

  nn::RMSNorm norm(5, 1e-6, DType::f64);
  {
    autograd::NoGradGuard g;
    copy_(norm.parameter("weight"), test::random_tensor({5}, DType::f64, 13));
  }
  Tensor h = test::random_tensor({4, 5}, DType::f64, 14);
  test::require_close(norm.forward(h), rms_norm_composite(h, norm.parameter("weight"), 1e-6), 1e-12, 1e-12);
}

TEST_CASE("layers: llama3 rotary frequency scaling", "[module]") {
  const int64_t d = 128;
  const double theta = 500000.0;
  nn::RopeScaling s;  // Llama 3.1: factor 8, low 1, high 4, original 8192
  auto plain = nn::rope_inverse_frequencies(d, theta, std::nullopt);
  auto scaled = nn::rope_inverse_frequencies(d, theta, s);
  int kept = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    REQUIRE(std::abs(plain[i] - std::pow(theta, -2.0 * static_cast<double>(i) / d)) < 1e-15);
    const double wavelen = 2 * std::numbers::pi / plain[i];
    if (wavelen < 8192.0 / 4) {
      REQUIRE(scaled[i] == plain[i]);
      ++kept;
    } else if (wavelen > 8192.0 / 1) {
      REQUIRE(std::abs(scaled[i] - plain[i] / 8) < 1e-18);
      ++divided;
    } else {
      REQUIRE(scaled[i] < plain[i]);
      REQUIRE(scaled[i] > plain[i] / 8);
      ++blended;
    }
  }
  REQUIRE(kept > 0);
  REQUIRE(divided > 0);
  REQUIRE(blended > 0);
  // Tables: cos^2 + sin^2 = 1 and position 0 is the identity rotation.
  nn::RotaryEmbedding rope(8, 10000.0, std::nullopt);
  auto [c, sn] = rope.tables(0, 5, kCPU);
  auto cv = c.to_vector<float>(), sv = sn.to_vector<float>();
  for (size_t i = 0; i < cv.size(); ++i) REQUIRE(std::abs(cv[i] * cv[i] + sv[i] * sv[i] - 1) < 1e-6);
  for (int i = 0; i < 4; ++i) REQUIRE(cv[static_cast<size_t>(i)] == 1.0f);
  auto [c2, s2] = rope.tables(3, 2, kCPU);
  test::require_equal(c2, narrow(c, 0, 3, 2));
  // Heads after the positions: the same rotation, forward and backward, from position 2.
  Tensor x = test::random_tensor({2, 5, 3, 8}, DType::f32, 40).set_requires_grad();  // (B, T, H, D)
  const Tensor g = test::random_tensor({2, 5, 3, 8}, DType::f32, 41);
  const Tensor got = rope.apply_heads_last(x, 2);
  const Tensor want = transpose(rope.apply(transpose(x, 1, 2), 2), 1, 2);
  test::require_equal(got, contiguous(want));
  test::require_equal(autograd::grad({got}, {x}, {g})[0], contiguous(autograd::grad({want}, {x}, {g})[0]));
  REQUIRE_THROWS_WITH(rope.apply_heads_last(ones({5, 8})), Catch::Matchers::ContainsSubstring("(..., T, H, 8)"));
}

TEST_CASE("llama config: parsing, named configs and errors", "[module]") {
  const nn::LlamaConfig c = nn::LlamaConfig::named("llama3.1-8b");
  REQUIRE(c.hidden_size == 4096);
  REQUIRE(c.num_key_value_heads == 8);
  REQUIRE(c.head_dim == 128);
  REQUIRE(c.rope_scaling.has_value());
  REQUIRE(c.rope_scaling->original_max_position_embeddings == 8192);
  REQUIRE(c.num_parameters() == 8030261248);  // Llama 3.1 8B
  const nn::LlamaConfig round = nn::LlamaConfig::from_json(c.to_json());
  REQUIRE(round.to_json() == c.to_json());
  if (const auto shared = test::shared_data("llama3.1-8b/config.json"); std::filesystem::exists(shared)) {
    const nn::LlamaConfig real = nn::LlamaConfig::named(shared.string());
    REQUIRE(real.to_json() == c.to_json());
  }
  // transformers >= 5 spells the dtype "dtype" and nests RoPE settings in "rope_parameters".
  const nn::LlamaConfig v5 = nn::LlamaConfig::from_json(R"({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
    "num_hidden_layers": 1, "num_attention_heads": 2, "dtype": "bfloat16", "initializer_range": 0.04,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})");
  REQUIRE(v5.rope_theta == 500000.0);
  REQUIRE(v5.rope_scaling.has_value());
  REQUIRE(v5.torch_dtype == DType::bf16);
  REQUIRE(v5.initializer_range == 0.04);
  REQUIRE(v5.num_key_value_heads == 2);
  REQUIRE(v5.head_dim == 4);
  REQUIRE_THROWS_WITH(nn::LlamaConfig::from_json("{"), ContainsSubstring("invalid JSON"));
  REQUIRE_THROWS_WITH(nn::LlamaConfig::from_json(R"({"vocab_size": 8})"), ContainsSubstring("hidden_size"));
  REQUIRE_THROWS_WITH(
      nn::LlamaConfig::from_json(
          R"({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3})"),
      ContainsSubstring("multiple of num_key_value_heads"));
  REQUIRE_THROWS_WITH(nn::LlamaConfig::named("no-such-model"), ContainsSubstring("neither a known config"));
  // A float where an integer belongs, and sizes whose parameter count leaves int64 (found by the fuzzer): errors.
  REQUIRE_THROWS_WITH(nn::LlamaConfig::from_json(R"({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 1e80,
    "num_hidden_layers": 1, "num_attention_heads": 2})"), ContainsSubstring("'intermediate_size' must be an integer"));
  REQUIRE_THROWS_WITH(nn::LlamaConfig::from_json(R"({"vocab_size": 256, "hidden_size": 860,
    "intermediate_size": 1966666666666662, "num_hidden_layers": 2, "num_attention_heads": 2})"),
                      ContainsSubstring("the parameter count overflows 64 bits"));
}

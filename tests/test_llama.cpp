// Llama built from a config (forward, KV cache, activation checkpointing, HF folder loading with
// its errors) and LoRA (wrapping by name, frozen base, merge, PEFT adapter files and their errors).
#include <catch2/catch_test_macros.hpp>
#include <chrono>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <filesystem>
#include <fstream>
#include <tuple>
#include <unistd.h>

#include "nn/llama.h"
#include "nn/lora.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

nn::LlamaConfig tiny_config(bool tied, int64_t kv_heads = 2) {
  nn::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.head_dim = 8;
  c.rope_theta = 10000;
  c.rope_scaling = nn::RopeScaling{4.0, 1.0, 4.0, 8};
  c.tie_word_embeddings = tied;
  c.rms_norm_eps = 1e-6;
  return c;
}

std::shared_ptr<nn::Llama> tiny_model(bool tied, DType dtype = DType::f64, uint64_t seed = 3) {
  nn::LlamaOptions o;
  o.dtype = dtype;
  o.seed = seed;
  auto m = std::make_shared<nn::Llama>(tiny_config(tied), o);
  // Norm weights away from 1 so they matter.
  autograd::NoGradGuard g;
  int i = 0;
  for (auto& [n, t] : m->named_parameters())
    if (n.ends_with("norm.weight")) copy_(t, add(test::random_tensor(t.shape(), dtype, 100 + i++), 1.0));
  return m;
}

Tensor random_ids(int64_t b, int64_t t, int64_t vocab, uint64_t seed) {
  Generator gen(seed);
  return randint(0, vocab, {b, t}, DType::i64, kCPU, &gen);
}

// Every LoRA layer's B (zeros at first) drawn at random, seeds from `seed` on.
void random_lora_b(nn::Module& m, uint64_t seed) {
  autograd::NoGradGuard g;
  for (auto& [path, l] : nn::lora_layers(m)) copy_(l->lora_b(), test::random_tensor(l->lora_b().shape(), DType::f32, seed++));
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("kiln_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void save_hf_folder(nn::Llama& m, const fs::path& dir, const std::vector<std::string>& drop = {},
                    const nn::NamedTensors& extra = {}) {
  std::ofstream(dir / "config.json") << m.config().to_json();
  nn::NamedTensors tensors;
  for (auto& [n, t] : m.state_dict())
    if (std::find(drop.begin(), drop.end(), n) == drop.end()) tensors.emplace_back(n, t);
  for (auto& e : extra) tensors.push_back(e);
  io::save_safetensors((dir / "model.safetensors").string(), tensors);
}

}  // namespace

TEST_CASE("llama: names match Hugging Face, tied and untied heads", "[llama]") {
  auto untied = tiny_model(false);
  auto sd = untied->state_dict();
  for (const char* k : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                        "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                        "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                        "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                        "model.norm.weight", "lm_head.weight"})
    REQUIRE(sd.count(k) == 1);
  REQUIRE(sd.size() == 1 + 2 * 9 + 1 + 1);
  REQUIRE(sd.at("model.layers.0.self_attn.k_proj.weight").shape() == Shape{16, 24});
  REQUIRE(untied->num_parameters() == untied->config().num_parameters());
  auto tied = tiny_model(true);
  REQUIRE(tied->state_dict().count("lm_head.weight") == 0);
  REQUIRE(tied->num_parameters() == tied->config().num_parameters());
  REQUIRE(tied->lm_head_weight().impl() == tied->model().child_as<nn::Embedding>("embed_tokens").weight().impl());
}

TEST_CASE("llama: the KV cache decodes token by token exactly as the full forward", "[llama]") {
  auto m = tiny_model(false);
  m->eval();
  autograd::NoGradGuard g;
  Tensor ids = random_ids(2, 9, 37, 5);
  Tensor full = m->logits(m->forward(ids));  // (2, 9, V)
  nn::KVCache cache = m->make_cache(2, 16);
  // a 4-token prompt, then one token at a time
  Tensor first = m->logits(m->forward(narrow(ids, 1, 0, 4), 0, &cache));
  test::require_close(first, narrow(full, 1, 0, 4), 1e-10, 1e-10);
  for (int64_t t = 4; t < 9; ++t) {
    Tensor step = m->logits(m->forward(narrow(ids, 1, t, 1), t, &cache));
    test::require_close(step, narrow(full, 1, t, 1), 1e-10, 1e-10);
  }
  REQUIRE(cache.length == 9);
  REQUIRE_THROWS_WITH(m->forward(narrow(ids, 1, 0, 8), 9, &cache), ContainsSubstring("KV cache holds 16"));
}

TEST_CASE("llama: activation checkpointing gives the same loss and gradients", "[llama]") {
  Tensor ids = random_ids(2, 7, 37, 8);
  Tensor targets = random_ids(2, 7, 37, 9);
  std::vector<std::vector<double>> grads[2];
  double losses[2];
  for (int ck = 0; ck < 2; ++ck) {
    auto m = tiny_model(false);
    m->set_checkpoint_activations(ck == 1);
    Tensor loss = m->loss(m->forward(ids), targets);
    loss.backward();
    losses[ck] = loss.item<double>();
    for (auto& [n, p] : m->named_parameters()) grads[ck].push_back(p.grad().to_vector<double>());
  }
  REQUIRE(losses[0] == losses[1]);
  REQUIRE(grads[0] == grads[1]);
}

TEST_CASE("llama: a decoder layer's input gradient matches finite differences in f64", "[llama]") {
  auto m = tiny_model(true);
  auto& layer = m->model().child_as<nn::ModuleList>("layers").at<nn::LlamaDecoderLayer>(1);
  test::check_gradients([&](const std::vector<Tensor>& in) { return layer.forward(in[0], 2); },
                        {test::random_tensor({2, 5, 24}, DType::f64, 10).set_requires_grad()}, 1e-6, 1e-4, 1e-7);
}

TEST_CASE("llama: loading a Hugging Face folder, with errors naming the key", "[llama]") {
  const fs::path dir = temp_dir("hf");
  auto src = tiny_model(false, DType::f32, 21);
  save_hf_folder(*src, dir);
  nn::LlamaOptions o;
  o.dtype = DType::f64;  // converted on load
  auto loaded = nn::Llama::from_pretrained(dir.string(), o);
  for (auto& [n, t] : src->state_dict()) test::require_close(cast(loaded->state_dict().at(n), DType::f32), t, 0, 0);

  const fs::path missing = temp_dir("hf_missing");
  save_hf_folder(*src, missing, {"model.layers.1.mlp.up_proj.weight"});
  REQUIRE_THROWS_WITH(nn::Llama::from_pretrained(missing.string()), ContainsSubstring("model.layers.1.mlp.up_proj.weight"));
  const fs::path extra = temp_dir("hf_extra");
  save_hf_folder(*src, extra, {}, {{"model.layers.2.mlp.up_proj.weight", ones({2})}});
  REQUIRE_THROWS_WITH(nn::Llama::from_pretrained(extra.string()), ContainsSubstring("unexpected tensor 'model.layers.2.mlp.up_proj.weight'"));
  const fs::path shaped = temp_dir("hf_shape");
  save_hf_folder(*src, shaped, {"model.norm.weight"}, {{"model.norm.weight", ones({23})}});
  REQUIRE_THROWS_WITH(nn::Llama::from_pretrained(shaped.string()), ContainsSubstring("model.norm.weight") && ContainsSubstring("(23,)"));
  // A truncated weights file names the offset problem instead of crashing.
  fs::resize_file(shaped / "model.safetensors", fs::file_size(shaped / "model.safetensors") / 2);
  REQUIRE_THROWS_AS(nn::Llama::from_pretrained(shaped.string()), Error);
  for (const fs::path& p : {dir, missing, extra, shaped}) fs::remove_all(p);
}

TEST_CASE("lora: wrapping by name, frozen base, zero-init identity, gradients only to adapters", "[lora]") {
  auto m = tiny_model(false);
  Tensor ids = random_ids(2, 6, 37, 30);
  Tensor targets = random_ids(2, 6, 37, 31);
  const Tensor base_logits = m->logits(m->forward(ids)).detach();
  nn::LoraConfig cfg;
  cfg.r = 3;
  cfg.alpha = 6;
  cfg.target_modules = {"q_proj", "v_proj", "down_proj"};
  auto wrapped = nn::apply_lora(*m, cfg, 7);
  REQUIRE(wrapped.size() == 6);
  REQUIRE(wrapped[0] == "model.layers.0.self_attn.q_proj");
  auto trainable = m->named_trainable_parameters();
  REQUIRE(trainable.size() == 12);
  REQUIRE(trainable[0].first == "model.layers.0.self_attn.q_proj.lora_A.weight");
  REQUIRE(m->state_dict().count("model.layers.0.self_attn.q_proj.base_layer.weight") == 1);  // peft's naming
  // B = 0: the wrapped model computes exactly the base model.
  test::require_close(m->logits(m->forward(ids)), base_logits, 0, 0);
  // Give B values, then only adapter parameters receive gradients.
  random_lora_b(*m, 40);
  m->loss(m->forward(ids), targets).backward();
  for (auto& [n, p] : m->named_parameters()) REQUIRE(p.grad().defined() == (n.find("lora_") != std::string::npos));
  // rsLoRA scaling
  nn::LoraConfig rs = cfg;
  rs.use_rslora = true;
  REQUIRE(rs.scaling() == 6.0 / std::sqrt(3.0));
  REQUIRE(cfg.scaling() == 2.0);
  nn::LoraConfig none = cfg;
  none.target_modules = {"nope"};
  REQUIRE_THROWS_WITH(nn::apply_lora(*tiny_model(false), none), ContainsSubstring("no linear layer matches"));
}

TEST_CASE("lora: f32 adapters compute in the activation dtype; merge and unmerge", "[lora]") {
  auto m = tiny_model(false, DType::f64);
  nn::LoraConfig cfg;
  cfg.r = 2;
  nn::apply_lora(*m, cfg, 1);
  autograd::NoGradGuard g;
  int i = 0;
  for (auto& [path, l] : nn::lora_layers(*m)) {
    REQUIRE(l->lora_a().dtype() == DType::f32);
    copy_(l->lora_b(), test::random_tensor(l->lora_b().shape(), DType::f32, 60 + i++));
  }
  m->eval();
  Tensor ids = random_ids(1, 5, 37, 61);
  const Tensor unmerged = m->logits(m->forward(ids));
  REQUIRE(unmerged.dtype() == DType::f64);
  const Tensor w_before = m->find_module("model.layers.0.mlp.up_proj.base_layer")->parameter("weight").clone();
  nn::merge_lora(*m);
  test::require_close(m->logits(m->forward(ids)), unmerged, 1e-6, 1e-6);  // f32 products inside the merge
  REQUIRE_THROWS_WITH(nn::merge_lora(*m), ContainsSubstring("already merged"));
  nn::unmerge_lora(*m);
  test::require_close(m->find_module("model.layers.0.mlp.up_proj.base_layer")->parameter("weight"), w_before, 1e-6, 1e-7);
  // Casting the model casts the base; the adapters stay f32.
  m->to(DType::bf16);
  REQUIRE(m->find_module("model.layers.0.mlp.up_proj.base_layer")->parameter("weight").dtype() == DType::bf16);
  REQUIRE(nn::lora_layers(*m).front().second->lora_a().dtype() == DType::f32);
  REQUIRE(m->logits(m->forward(ids)).dtype() == DType::bf16);
}

TEST_CASE("lora: target_modules as a regex (PEFT's string form); bad or catastrophic patterns", "[lora]") {
  nn::LoraConfig c;
  c.target_regex = R"(.*\.(q|v)_proj)";
  c.target_modules.clear();
  CHECK(c.matches("model.layers.0.self_attn.q_proj"));
  CHECK(c.matches("model.layers.1.self_attn.v_proj"));
  CHECK_FALSE(c.matches("model.layers.0.self_attn.k_proj"));
  CHECK_FALSE(c.matches("q_proj"));
  // A pattern std::regex cannot compile is a kiln::Error (tests/fuzz/regressions/adapter_config).
  c.target_regex = "(q|v_proj";
  CHECK_THROWS_WITH(c.validate(), ContainsSubstring("[lora] target_modules regex '(q|v_proj' does not compile"));
  CHECK_THROWS_WITH(c.matches("q_proj"), ContainsSubstring("does not compile"));
  // Numbers libstdc++'s regex compiler would overflow on are refused before it sees them.
  c.target_regex = R"((q)\1)";
  CHECK_THROWS_WITH(c.validate(), ContainsSubstring("back-references"));
  c.target_regex = R"((q)\2222222222222222222)";  // \222 is an octal escape (as in Python), then digits
  CHECK_NOTHROW(c.validate());
  CHECK_FALSE(c.matches("q_proj"));
  c.target_regex = "q_proj{99999999999999999999}";
  CHECK_THROWS_WITH(c.validate(), ContainsSubstring("does not compile"));
  // Backtracking would take 2^40 steps here; the DFA matcher is linear in the path.
  c.target_regex = "(a?){40}a{40}";
  CHECK(c.matches(std::string(40, 'a')));
  CHECK_FALSE(c.matches(std::string(39, 'a') + "b"));
  // Nested repetitions (found by the fuzzer: libstdc++'s regex compiler ran for minutes) fail at once.
  c.target_regex = "((((((q{1}){9}){9})2{6}){9}){9})";
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(c.validate(), ContainsSubstring("does not compile"));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  // Python's re syntax PEFT users write: classes, alternation, non-capturing groups
  c.target_regex = R"(model\.layers\.\d+\.(?:self_attn|mlp)\.(q|k|gate)_proj)";
  CHECK(c.matches("model.layers.12.self_attn.q_proj"));
  CHECK(c.matches("model.layers.0.mlp.gate_proj"));
  CHECK_FALSE(c.matches("model.layers.0.mlp.gate_proj.lora_A"));
  CHECK_FALSE(c.matches("xmodel.layers.0.mlp.gate_proj"));
}

TEST_CASE("lora: PEFT adapter folders round trip; bad folders are errors that change nothing", "[lora]") {
  const fs::path dir = temp_dir("adapter");
  auto m = tiny_model(false);
  nn::LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.use_rslora = true;
  nn::apply_lora(*m, cfg, 2);
  {
    autograd::NoGradGuard g;
    int i = 0;
    for (auto& [path, l] : nn::lora_layers(*m)) copy_(l->lora_b(), test::random_tensor(l->lora_b().shape(), DType::f32, 80 + i++));
  }
  nn::save_adapter(*m, cfg, dir.string());
  const io::SafetensorsFile f = io::SafetensorsFile::open((dir / "adapter_model.safetensors").string());
  REQUIRE(f.keys().size() == 2 * 7 * 2);
  REQUIRE(f.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  REQUIRE(f.info("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight").shape == Shape{4, 24});
  const nn::LoraConfig back = nn::read_adapter_config(dir.string());
  REQUIRE(back.r == 4);
  REQUIRE(back.use_rslora);
  REQUIRE(back.target_modules == cfg.target_modules);

  // Into a fresh base model (same base weights): the same logits.
  auto fresh = tiny_model(false);
  nn::load_adapter(*fresh, dir.string());
  Tensor ids = random_ids(2, 5, 37, 90);
  m->eval();
  fresh->eval();
  test::require_close(fresh->logits(fresh->forward(ids)), m->logits(m->forward(ids)), 0, 0);

  // Errors: a tensor missing, a wrong shape, an extra key, DoRA; the model is untouched by each.
  auto untouched = tiny_model(false);
  const size_t params_before = untouched->named_parameters().size();
  auto rewrite = [&](const std::string& drop, const nn::NamedTensors& add) {
    nn::NamedTensors t;
    for (const std::string& k : f.keys())
      if (k != drop) t.emplace_back(k, f.get(k));
    for (auto& a : add) t.push_back(a);
    io::save_safetensors((dir / "adapter_model.safetensors").string(), t);
  };
  const std::string key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight";
  const Tensor kept = f.get(key).clone();
  rewrite(key, {});
  REQUIRE_THROWS_WITH(nn::load_adapter(*untouched, dir.string()), ContainsSubstring("missing tensor '" + key + "'"));
  rewrite(key, {{key, ones({4, 23})}});
  REQUIRE_THROWS_WITH(nn::load_adapter(*untouched, dir.string()), ContainsSubstring(key) && ContainsSubstring("(4, 23)"));
  rewrite("", {{"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight", ones({4, 24})}});
  REQUIRE_THROWS_WITH(nn::load_adapter(*untouched, dir.string()), ContainsSubstring("unexpected tensor"));
  REQUIRE(untouched->named_parameters().size() == params_before);
  REQUIRE(nn::lora_layers(*untouched).empty());
  std::ofstream(dir / "adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "target_modules": ["q_proj"]})";
  REQUIRE_THROWS_WITH(nn::load_adapter(*untouched, dir.string()), ContainsSubstring("DoRA"));
  std::ofstream(dir / "adapter_config.json") << "{ not json";
  REQUIRE_THROWS_WITH(nn::load_adapter(*untouched, dir.string()), ContainsSubstring("invalid JSON"));
  (void)kept;
  fs::remove_all(dir);
}

namespace {

// LoRA layers around f64 Linear bases taking 12 inputs, `outs` outputs each, rank `ranks[i]` (alpha 6), B random.
std::vector<std::shared_ptr<nn::LoraLinear>> lora_group(const std::vector<int64_t>& outs, const std::vector<int64_t>& ranks) {
  std::vector<std::shared_ptr<nn::LoraLinear>> out;
  for (size_t i = 0; i < outs.size(); ++i) {
    Generator gen(500 + i);
    nn::Init init{nn::Init::Kind::normal, 0.3, &gen};
    nn::LoraConfig cfg;
    cfg.r = ranks[i];
    cfg.alpha = 6;
    auto l = std::make_shared<nn::LoraLinear>(std::make_shared<nn::Linear>(12, outs[i], false, DType::f64, kCPU, init), cfg, &gen);
    autograd::NoGradGuard g;
    copy_(l->lora_b(), test::random_tensor(l->lora_b().shape(), DType::f32, 510 + i));
    out.push_back(l);
  }
  return out;
}

struct GroupRun {
  std::vector<Tensor> outputs, grads;  // the outputs; x's gradient, then each layer's dA and dB
  int matmuls = 0;
};

// sum_i sum(y_i * w_i) over the layers in `used`, forward and backward, shared or one layer at a time.
GroupRun run_group(const std::vector<std::shared_ptr<nn::LoraLinear>>& layers, const Tensor& x0, bool shared,
                   const std::vector<bool>& used) {
  GroupRun r;
  Tensor x = x0.detach();
  x.set_requires_grad(true);
  for (auto& l : layers) l->zero_grad();
  test::KernelCounter counter;
  {
    HandlerScope scope(&counter);
    std::vector<nn::LinearBase*> ptrs;
    for (auto& l : layers) ptrs.push_back(l.get());
    if (shared) r.outputs = nn::shared_input_forward(ptrs, x);
    else
      for (auto* l : ptrs) r.outputs.push_back((*l)(x));
    Tensor loss;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!used[i]) continue;
      const Tensor term = sum(mul(r.outputs[i], test::random_tensor(r.outputs[i].shape(), DType::f64, 520 + i)));
      loss = loss.defined() ? add(loss, term) : term;
    }
    loss.backward();
  }
  r.matmuls = counter.count("matmul");
  r.grads.push_back(x.grad());
  for (auto& l : layers)
    for (const Tensor& w : {l->lora_a(), l->lora_b()}) r.grads.push_back(w.grad());
  return r;
}

void require_same(const GroupRun& a, const GroupRun& b) {
  REQUIRE(a.outputs.size() == b.outputs.size());
  for (size_t i = 0; i < a.outputs.size(); ++i) test::require_close(a.outputs[i], b.outputs[i], 1e-12, 1e-12);
  for (size_t i = 0; i < a.grads.size(); ++i) {
    // An adapter whose output nothing uses: no gradient one by one, zeros where its A shares the product
    const Tensor& g = a.grads[i].defined() ? a.grads[i] : b.grads[i];
    if (!g.defined()) continue;
    if (!a.grads[i].defined() || !b.grads[i].defined()) test::require_close(g, zeros_like(g), 0, 0);
    else test::require_close(a.grads[i], b.grads[i], 1e-6, 1e-9);  // f32 adapter gradients
  }
}

}  // namespace

TEST_CASE("lora: adapters on one input share their GEMMs and give each layer's own results", "[lora]") {
  const Tensor x = test::random_tensor({2, 5, 12}, DType::f64, 530);
  auto layers = lora_group({10, 6, 6}, {3, 3, 3});
  const std::vector<bool> all(3, true);
  SECTION("one x @ A^T forward, one dA and one dx backward, for three layers") {
    const GroupRun alone = run_group(layers, x, false, all), shared = run_group(layers, x, true, all);
    require_same(shared, alone);
    // one by one: 3 x A^T + 3 u B^T + 3 bases forward; 3 x (du, dB, dA, dx) + 3 base dx backward = 24
    REQUIRE(alone.matmuls == 24);
    REQUIRE(shared.matmuls == 24 - 3 * 2);  // two fewer products in each of forward, dA and dx
  }
  SECTION("an output the loss does not use") {
    const std::vector<bool> some{true, false, true};
    const GroupRun alone = run_group(layers, x, false, some), shared = run_group(layers, x, true, some);
    require_same(shared, alone);
    REQUIRE(!alone.grads[3].defined());  // layer 1's A: no gradient one by one,
    REQUIRE(shared.grads[3].defined());  // zeros where its rows are part of the shared product
    REQUIRE(!shared.grads[4].defined());  // its B: none either way
  }
  SECTION("a layer with a forward hook, dropout at work, a merged adapter or another rank: one layer at a time") {
    const int alone = run_group(layers, x, false, all).matmuls;
    std::vector<kiln::HookHandle> handles;
    SECTION("hook") {
      int calls = 0;
      handles.push_back(layers[1]->register_forward_pre_hook([&](nn::Module&, nn::Module::ForwardCall&) { ++calls; }));
      const GroupRun shared = run_group(layers, x, true, all);
      REQUIRE(calls == 1);
      REQUIRE(shared.matmuls == alone);
    }
    SECTION("another rank") {
      auto mixed = lora_group({10, 6, 6}, {3, 2, 3});
      const GroupRun a = run_group(mixed, x, false, all), s = run_group(mixed, x, true, all);
      require_same(s, a);
      REQUIRE(s.matmuls == a.matmuls);
    }
    SECTION("dropout while training; shared again in eval") {
      nn::LoraConfig cfg;
      cfg.r = 3;
      cfg.dropout = 0.25;
      std::vector<std::shared_ptr<nn::LoraLinear>> drop;
      for (int64_t out : {10, 6}) drop.push_back(std::make_shared<nn::LoraLinear>(std::make_shared<nn::Linear>(12, out, false, DType::f64), cfg));
      const std::vector<bool> two(2, true);
      REQUIRE(run_group(drop, x, true, two).matmuls == run_group(drop, x, false, two).matmuls);
      for (auto& l : drop) l->eval();
      const GroupRun a = run_group(drop, x, false, two), s = run_group(drop, x, true, two);
      require_same(s, a);
      REQUIRE(s.matmuls == a.matmuls - 3);
    }
    SECTION("merged") {
      layers[2]->merge();
      const GroupRun a = run_group(layers, x, false, all), s = run_group(layers, x, true, all);
      require_same(s, a);
      REQUIRE(s.matmuls == a.matmuls);
      REQUIRE(a.matmuls == alone - 6);  // the merged layer: its base's product and input gradient only
    }
  }
  SECTION("bad input is an error naming the layer") {
    std::vector<nn::LinearBase*> ptrs{layers[0].get(), nullptr};
    REQUIRE_THROWS_WITH(nn::shared_input_forward(ptrs, x), ContainsSubstring("layer 1 is null"));
    auto wide = std::make_shared<nn::Linear>(13, 4, false, DType::f64);
    ptrs = {layers[0].get(), wide.get()};
    REQUIRE_THROWS_WITH(nn::shared_input_forward(ptrs, x), ContainsSubstring("layer 1 (Linear) takes 13 inputs, x has 12"));
    REQUIRE_THROWS_WITH(nn::shared_input_forward(ptrs, Tensor()), ContainsSubstring("x must be a defined tensor"));
  }
}

// The matmuls a scope runs: (their inner dim K, their output's last dim N, whether the GEMM has an addend).
struct GemmLog : DispatchHandler {
  std::vector<std::tuple<int64_t, int64_t, bool>> calls;
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (std::string(op->name()) == "matmul") calls.emplace_back(inputs[0].size(-1), inputs[1].size(-1), inputs.size() > 2);
    return dispatch_next(op, inputs);
  }
};
using Gemms = std::vector<std::tuple<int64_t, int64_t, bool>>;

TEST_CASE("lora: the rank-r GEMMs add the base output forward, and write dx for the base GEMM to add to", "[lora]") {
  // Forward, each u @ B^T GEMM takes the base output as its addend (the base GEMM has none: with one it
  // ran slower on an H100 than the pass it saved). One layer runs its base first, so autograd (latest
  // first) runs backward's du @ A before the base's dy @ W: the memory-bound rank-r GEMM writes dx and
  // the compute-bound base GEMM adds to it in its epilogue.
  const Tensor x = test::random_tensor({2, 4, 12}, DType::f64, 540);  // 8 tokens
  auto layers = lora_group({10, 6}, {3, 3});
  for (auto& l : layers) {  // B away from its zero init
    nn::Linear& b = l->child_as<nn::Linear>("lora_B");
    autograd::NoGradGuard g;
    copy_(b.weight(), test::random_tensor(b.weight().shape(), DType::f32, 541));
  }
  SECTION("one layer") {
    const Tensor leaf = x.detach().set_requires_grad(true);
    const Tensor xi = mul(leaf, 2.0);  // a tensor inside the graph, as a layer's input is
    GemmLog fwd, bwd;
    Tensor y;
    {
      HandlerScope scope(&fwd);
      y = (*layers[0])(xi);
    }
    REQUIRE(fwd.calls == Gemms{{12, 10, false}, {12, 3, false}, {3, 10, true}});  // base, x A^T, u B^T + y
    {
      HandlerScope scope(&bwd);
      sum(mul(y, test::random_tensor(y.shape(), DType::f64, 542))).backward();
    }
    // dx: du @ A (K = r = 3) fresh, then dy @ W (K = 10) with it as the addend (dA = du^T x has K = 8)
    Gemms dx;
    for (const auto& call : bwd.calls)
      if (std::get<1>(call) == 12 && std::get<0>(call) != 8) dx.push_back(call);
    REQUIRE(dx == Gemms{{3, 12, false}, {10, 12, true}});
  }
  SECTION("two layers on one input") {
    GemmLog fwd;
    {
      HandlerScope scope(&fwd);
      (void)nn::shared_input_forward({layers[0].get(), layers[1].get()}, x);
    }
    // x [A_0; A_1]^T, then per layer x W_i^T and s u_i B_i^T + it
    REQUIRE(fwd.calls == Gemms{{12, 6, false}, {12, 10, false}, {3, 10, true}, {12, 6, false}, {3, 6, true}});
  }
}

TEST_CASE("lora: a Llama whose projections share their adapters' GEMMs gives the one-by-one loss and gradients", "[lora][llama]") {
  auto run = [](bool hooks) {
    auto m = tiny_model(false, DType::f64);
    nn::LoraConfig cfg;
    cfg.r = 4;
    nn::apply_lora(*m, cfg, 11);
    random_lora_b(*m, 540);
    std::vector<kiln::HookHandle> handles;  // a hook on q_proj and on gate_proj: each group one layer at a time
    if (hooks)
      for (const char* p : {"self_attn.q_proj", "mlp.gate_proj"})
        for (int layer = 0; layer < 2; ++layer)
          handles.push_back(m->find_module(fmt::format("model.layers.{}.{}", layer, p))
                                ->register_forward_pre_hook([](nn::Module&, nn::Module::ForwardCall&) {}));
    test::KernelCounter counter;
    Tensor loss;
    {
      HandlerScope scope(&counter);
      loss = m->loss(m->forward(random_ids(2, 7, 37, 541)), random_ids(2, 7, 37, 542));
      loss.backward();
    }
    std::vector<Tensor> grads{loss.detach()};
    for (auto& [n, p] : m->named_trainable_parameters()) grads.push_back(p.grad());
    return std::make_pair(grads, counter.count("matmul"));
  };
  const auto [shared, shared_matmuls] = run(false);
  const auto [alone, alone_matmuls] = run(true);
  REQUIRE(shared.size() == alone.size());
  for (size_t i = 0; i < shared.size(); ++i) test::require_close(shared[i], alone[i], 1e-6, 1e-9);
  // Per layer: q, k, v two fewer products in forward, dA and dx; gate, up one fewer in each. Layer 0's
  // q, k, v input (the norm of frozen embeddings) needs no gradient: no dx products there.
  REQUIRE(alone_matmuls - shared_matmuls == 2 * (2 * 3 + 1 * 3) - 2);
}

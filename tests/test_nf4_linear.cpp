// NF4Linear (the QLoRA base layer): equals a linear layer over the dequantised weight, quantising a
// Llama layer by layer while it is built or loaded, LoRA on top of an NF4 base, and its buffers
// keeping their dtypes when the model is cast.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <filesystem>
#include <fstream>

#include "core/cuda/runtime.h"
#include "core/dispatch.h"
#include "core/memory.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

nn::LlamaConfig small_config() {
  nn::LlamaConfig c;
  c.vocab_size = 50;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  return c;
}

}  // namespace

TEST_CASE("nf4 linear: the layer equals a linear over its dequantised weight", "[nf4_linear]") {
  nn::Linear lin(70, 33, true, DType::f32);  // 70*33 is not a multiple of the block
  auto q = nn::NF4Linear::from_linear(lin);
  REQUIRE(q->in_features() == 70);
  REQUIRE(q->out_features() == 33);
  Tensor x = test::random_tensor({3, 5, 70}, DType::f32, 1);
  const Tensor w = q->dequantized_weight(DType::f32);  // (33, 70)
  test::require_close(q->forward(x), add(matmul(x, transpose(w, 0, 1)), lin.bias()), 1e-5, 1e-5);
  // NF4 stays close to the original weight: |error| <= half a level gap times the block absmax.
  const auto wv = w.to_vector<float>(), ov = lin.weight().to_vector<float>();
  for (size_t i = 0; i < wv.size(); ++i) REQUIRE(std::abs(wv[i] - ov[i]) < 0.1f);
  REQUIRE(q->named_parameters().size() == 1);  // the bias, frozen
  REQUIRE_FALSE(q->parameter("bias").requires_grad());
  REQUIRE(q->state_dict().count("weight") == 1);
  REQUIRE(q->state_dict().at("weight").dtype() == DType::u8);
  // Casting the module leaves the codes and scales alone.
  q->to(DType::f64);
  REQUIRE(q->buffer("weight_nested_absmax").dtype() == DType::f32);
  REQUIRE(q->parameter("bias").dtype() == DType::f64);
  REQUIRE_THROWS_WITH(q->forward(ones({2, 69})), ContainsSubstring("[NF4Linear]"));
}

namespace {
// Counts NF4 dequantisations dispatched on this thread.
struct DequantCounter : DispatchHandler {
  int calls = 0;
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (std::string(op->name()) == "nf4_dequantize") ++calls;
    return dispatch_next(op, inputs);
  }
};
}  // namespace

TEST_CASE("nf4 linear: a layer keeping its weight dequantised gives the same results without dequantising", "[nf4_linear]") {
  nn::Linear lin(96, 40, false, DType::f32);
  auto q = nn::NF4Linear::from_linear(lin);
  const Tensor x0 = test::random_tensor({2, 7, 96}, DType::bf16, 5);
  const Tensor g = test::random_tensor({2, 7, 40}, DType::bf16, 6);
  auto run = [&](Tensor* dx) {  // forward and backward; the NF4 dequantisations they dispatch
    DequantCounter count;
    HandlerScope scope(&count);
    Tensor x = x0.detach().set_requires_grad(true);
    Tensor y = (*q)(x);
    y.backward(g);
    if (dx) *dx = x.grad();
    return std::pair{y.detach(), count.calls};
  };
  Tensor dx_plain, dx_kept;
  const auto [y_plain, plain_calls] = run(&dx_plain);
  CHECK(plain_calls == 2);  // forward, and again for backward
  const size_t before = memory_usage(kCPU).allocated;
  q->keep_dequantized(true);
  CHECK(q->keeps_dequantized());
  const auto [y_kept, first_calls] = run(&dx_kept);
  CHECK(first_calls == 1);  // built once, used by forward and backward
  CHECK(memory_usage(kCPU).allocated - before >= 40 * 96 * 2);  // held: (40, 96) bf16
  test::require_close(y_kept, y_plain, 0.0, 0.0);
  test::require_close(dx_kept, dx_plain, 0.0, 0.0);
  CHECK(run(nullptr).second == 0);  // then never again
  // Written NF4 tensors (a checkpoint loaded into the layer) are seen: built again from them.
  nn::Linear other(96, 40, false, DType::f32);
  q->load_state_dict(nn::NF4Linear::from_linear(other)->state_dict());
  const auto [y_loaded, loaded_calls] = run(nullptr);
  CHECK(loaded_calls == 1);
  const size_t held = memory_usage(kCPU).allocated;
  q->keep_dequantized(false);
  CHECK(held - memory_usage(kCPU).allocated >= 40 * 96 * 2);  // off: freed
  test::require_close(y_loaded, run(nullptr).first, 0.0, 0.0);
  // A Llama sets it per decoder layer.
  nn::LlamaOptions o;
  o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  nn::Llama model(test::tiny_llama_config(3), o);
  CHECK(model.dequantized_layers() == 0);
  model.set_dequantized_layers(2);
  CHECK(model.dequantized_layers() == 2);
  const auto& c = model.config();
  const int64_t per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim +
                            c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size;
  CHECK(model.dequantized_layer_bytes() == static_cast<size_t>(per_layer) * 4);  // f32 model
  REQUIRE_THROWS_WITH(model.set_dequantized_layers(4), ContainsSubstring("0 to 3"));
  model.set_dequantized_layers(0);
  CHECK(model.dequantized_layers() == 0);
}

TEST_CASE("nf4 linear: a Llama quantised layer by layer while it is built", "[nf4_linear]") {
  nn::LlamaOptions o;
  o.seed = 4;
  auto dense = std::make_shared<nn::Llama>(small_config(), o);
  int built = 0;
  o.on_layer_built = [&](const std::string& prefix, nn::LlamaDecoderLayer& layer) {
    REQUIRE(prefix == "model.layers." + std::to_string(built++) + ".");
    REQUIRE(nn::quantize_linears_nf4(layer) == 7);
  };
  auto q = std::make_shared<nn::Llama>(small_config(), o);
  REQUIRE(built == 2);
  REQUIRE(q->find_module("model.layers.1.mlp.down_proj")->type_name() == "NF4Linear");
  // The same seed gave the same dense weights, so the NF4 model is a close approximation.
  Generator gen(9);
  Tensor ids = randint(0, 50, {2, 7}, DType::i64, kCPU, &gen);
  autograd::NoGradGuard g;
  const Tensor ld = dense->logits(dense->forward(ids)), lq = q->logits(q->forward(ids));
  const auto dv = ld.to_vector<float>(), qv = lq.to_vector<float>();
  double diff = 0, scale = 0;
  for (size_t i = 0; i < dv.size(); ++i) diff = std::max(diff, double(std::abs(dv[i] - qv[i]))), scale = std::max(scale, double(std::abs(dv[i])));
  REQUIRE(diff > 0);
  REQUIRE(diff < 0.2 * scale);
}

TEST_CASE("nf4 linear: LoRA over an NF4 base trains the adapters only", "[nf4_linear]") {
  nn::LlamaOptions o;
  o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto m = std::make_shared<nn::Llama>(small_config(), o);
  nn::LoraConfig cfg;
  cfg.r = 4;
  REQUIRE(nn::apply_lora(*m, cfg, 3).size() == 14);
  REQUIRE(m->find_module("model.layers.0.self_attn.q_proj.base_layer")->type_name() == "NF4Linear");
  {
    autograd::NoGradGuard g;
    int i = 0;
    for (auto& [p, l] : nn::lora_layers(*m)) copy_(l->lora_b(), test::random_tensor(l->lora_b().shape(), DType::f32, 30 + i++));
  }
  Generator gen(2);
  Tensor ids = randint(0, 50, {2, 6}, DType::i64, kCPU, &gen);
  m->loss(m->forward(ids), randint(0, 50, {2, 6}, DType::i64, kCPU, &gen)).backward();
  int with_grad = 0;
  for (auto& [n, p] : m->named_parameters()) {
    REQUIRE(p.grad().defined() == (n.find("lora_") != std::string::npos));
    with_grad += p.grad().defined();
  }
  REQUIRE(with_grad == 28);
  auto& layer = *nn::lora_layers(*m).front().second;
  REQUIRE_THROWS_WITH(layer.merge(), ContainsSubstring("quantised base"));
}

TEST_CASE("nf4 linear: a bnb-4bit Hugging Face folder loads into Llama bit for bit", "[nf4_linear]") {
  // tests/data/nf4/tiny_llama_bnb4: transformers + bitsandbytes 0.50 (nf4, double quantisation), written
  // with save_pretrained; the reference holds bnb's own dequantisation of every layer (tools/make_nf4_fixtures.py).
  const std::string dir = test::test_data("nf4/tiny_llama_bnb4").string();
  nn::LlamaOptions o;
  o.dtype = DType::bf16;
  auto m = nn::Llama::from_pretrained(dir, o);
  REQUIRE(m->config().rope_theta == 10000.0);  // read from transformers 5's "rope_parameters"
  const auto ref = io::SafetensorsFile::open(test::test_data("nf4/tiny_llama_reference.safetensors").string());
  int checked = 0;
  for (auto& [path, mod] : m->named_modules()) {
    auto* q = dynamic_cast<nn::NF4Linear*>(mod);
    if (!q) continue;
    test::require_equal(q->dequantized_weight(DType::bf16), ref.get(path + ".weight.dequant"));
    ++checked;
  }
  REQUIRE(checked == 14);
  REQUIRE(m->find_module("lm_head")->type_name() == "Linear");  // bnb keeps the head unquantised
  // A QLoRA adapter on top trains.
  nn::LoraConfig cfg;
  cfg.r = 2;
  nn::apply_lora(*m, cfg);
  Generator gen(1);
  Tensor ids = randint(0, m->config().vocab_size, {1, 5}, DType::i64, kCPU, &gen);
  m->loss(m->forward(ids), ids).backward();
  REQUIRE(nn::lora_layers(*m).front().second->lora_a().grad().defined());
}

TEST_CASE("nf4 linear: quantising while loading keeps the GPU peak near one bf16 layer", "[nf4_linear][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  // A bf16 HF folder of 8 layers whose embeddings are small next to a layer.
  nn::LlamaConfig c = small_config();
  c.vocab_size = 32;
  c.hidden_size = 256;
  c.intermediate_size = 1024;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.head_dim = 64;
  c.torch_dtype = DType::bf16;
  nn::LlamaOptions dense_o;
  dense_o.dtype = DType::bf16;
  nn::Llama dense(c, dense_o);
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kiln_nf4_stream";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << c.to_json();
  nn::NamedTensors all;
  for (auto& [n, t] : dense.state_dict()) all.emplace_back(n, t);
  io::save_safetensors((dir / "model.safetensors").string(), all);
  const int64_t layer_bytes = (4 * 256 * 256 + 3 * 256 * 1024) * 2;  // one decoder layer's linears in bf16

  cuda::synchronize();
  const size_t before = cuda::memory_stats().allocated;
  cuda::reset_peak_memory_stats();
  nn::LlamaOptions o;
  o.dtype = DType::bf16;
  o.device = Device(DeviceType::cuda, 0);
  o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto q = nn::Llama::from_pretrained(dir.string(), o);
  cuda::synchronize();
  const cuda::MemoryStats st = cuda::memory_stats();
  const int64_t resident = static_cast<int64_t>(st.allocated - before);
  const int64_t over = static_cast<int64_t>(st.peak_allocated - before) - resident;
  INFO("resident " << resident << " B, peak above resident " << over << " B, one bf16 layer " << layer_bytes << " B");
  REQUIRE(resident < 8 * layer_bytes / 3);  // NF4: about a quarter of bf16
  REQUIRE(over <= layer_bytes * 3 / 2);      // never more than ~one bf16 layer on top
  std::filesystem::remove_all(dir);
}

TEST_CASE("nf4 linear: a residual added in the GEMMs equals the separate add, forward and backward", "[nf4_linear]") {
  // A block's last layer adds the residual stream in its GEMM (LinearBase::residual_add), and the NF4
  // base sums the input gradient gathered so far (a LoRA path's) into its backward GEMM: no add op
  // either way, the same values as the unfused ops.
  nn::Linear dense(24, 16, false, DType::f32);
  {
    autograd::NoGradGuard g;
    copy_(dense.weight(), test::random_tensor({16, 24}, DType::f32, 70));
  }
  nn::LoraConfig cfg;
  cfg.r = 4;
  Generator gen(71);
  auto lora = std::make_shared<nn::LoraLinear>(nn::NF4Linear::from_linear(dense), cfg, &gen);
  {
    autograd::NoGradGuard g;
    copy_(lora->lora_b(), test::random_tensor(lora->lora_b().shape(), DType::f32, 72));
  }
  auto nf4 = nn::NF4Linear::from_linear(dense);
  std::vector<std::pair<const char*, nn::LinearBase*>> layers = {{"Linear", &dense}, {"NF4Linear", nf4.get()},
                                                                 {"LoRA over NF4", lora.get()}};
  const Tensor x0 = test::random_tensor({2, 5, 24}, DType::f32, 73), r0 = test::random_tensor({2, 5, 16}, DType::f32, 74);
  const Tensor c = test::random_tensor({2, 5, 16}, DType::f32, 75), cx = test::random_tensor({2, 5, 24}, DType::f32, 76);
  for (auto [name, layer] : layers) {
    INFO(name);
    for (bool hooked : {false, true}) {
      INFO("a forward hook on the layer " << hooked);
      int hook_calls = 0;
      HookHandle hook;
      if (hooked) hook = layer->register_forward_pre_hook([&](nn::Module&, nn::Module::ForwardCall&) { ++hook_calls; });
      auto run = [&](bool fused, int& adds) {
        Tensor x = x0.detach().set_requires_grad(), r = r0.detach().set_requires_grad();
        test::OpCounter ops;
        const Tensor xs = mul(x, 1.0);  // a node, so the engine gathers its gradients
        const Tensor y = fused ? layer->residual_add(r, xs) : add(r, (*layer)(xs));
        const Tensor loss = add(sum(mul(y, c)), sum(mul(xs, cx)));  // xs: a second consumer after the layer
        std::vector<Tensor> params = {x, r};
        if (layer == lora.get()) params.push_back(lora->lora_a()), params.push_back(lora->lora_b());
        std::vector<Tensor> grads = autograd::grad({loss}, params);
        adds = ops.count("add");
        grads.insert(grads.begin(), y.detach());
        return grads;
      };
      int fused_adds = 0, plain_adds = 0;
      const std::vector<Tensor> got = run(true, fused_adds), want = run(false, plain_adds);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) test::require_close(got[i], want[i], 1e-5, 1e-5);
      // the loss's own add is the only one left when the layer has no hooks; with one, the layer's
      // output is what the hooks saw and the residual is a separate add
      CHECK(fused_adds == (hooked ? plain_adds : 1));
      CHECK(hook_calls == (hooked ? 2 : 0));
      hook.remove();
    }
  }
  // a residual that does not fit the GEMM falls back to an add; a wrong one is an error
  Tensor rb = test::random_tensor({2, 5, 16}, DType::f32, 77).transpose(0, 1).contiguous().transpose(0, 1);  // strided
  test::require_close(nf4->residual_add(rb, x0), add(rb, nf4->forward(x0)), 1e-5, 1e-5);
  REQUIRE_THROWS_WITH(quant::nf4_linear(x0, nf4->weight(), Tensor(), Tensor(), ones({2, 5, 15})),
                      ContainsSubstring("[nf4_linear] the residual must be (2, 5, 16) f32"));
  REQUIRE_THROWS_WITH(nf4->residual_add(ones({2, 5, 15}), x0), ContainsSubstring("add"));
}

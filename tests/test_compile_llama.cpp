// compile/ on Llama models: Module::compile() on decoder layers, a compiled Llama against eager
// (forward and backward), one compilation for 20 sequence lengths and one more per dtype, QLoRA with
// LoRA dropout and checkpointed / offloaded layers, and the Trainer's compile seam.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "compile/compile.h"
#include "core/ops.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {


// max |a - b| <= rel * max |b|: relative to the tensor's scale, so a sum that cancels to near zero
// in one element (an embedding row hit by several tokens) is not held to its own tiny magnitude.
void require_rel(const Tensor& a, const Tensor& b, double rel) {
  REQUIRE(a.shape() == b.shape());
  const double scale = amax(abs(b.to(DType::f64))).item<double>();
  const double diff = a.numel() ? amax(abs(a.to(DType::f64) - b.to(DType::f64))).item<double>() : 0.0;
  INFO("max |diff| " << diff << ", max |reference| " << scale);
  REQUIRE(diff <= rel * scale);
}

}  // namespace

namespace {

Tensor random_ids(int64_t b, int64_t t, uint64_t seed) {
  Generator gen(seed);
  return randint(0, 41, {b, t}, DType::i64, kCPU, &gen);
}

nn::LlamaDecoderLayer& layer0(nn::Llama& m) {
  return m.model().child_as<nn::ModuleList>("layers").at<nn::LlamaDecoderLayer>(0);
}

}  // namespace

TEST_CASE("compile: Module::compile() compiles a Llama's decoder layers, or a module's whole forward", "[compile][llama]") {
  nn::LlamaOptions o;
  o.seed = 4;
  nn::Llama eager(test::tiny_llama_config(2), o), compiled(test::tiny_llama_config(2), o);
  compiled.compile();
  const Tensor ids = random_ids(2, 7, 6);
  compile::reset_stats();
  const Tensor he = eager(ids), hc = compiled(ids);
  require_rel(hc, he, 1e-5);
  REQUIRE(compile::stats().calls == 2);  // one per decoder layer
  sum(square(hc)).backward();
  sum(square(he)).backward();
  const auto pe = eager.named_parameters(), pc = compiled.named_parameters();
  for (size_t i = 0; i < pe.size(); ++i) {
    CAPTURE(pe[i].first);
    if (pe[i].second.grad().defined()) require_rel(pc[i].second.grad(), pe[i].second.grad(), 1e-5);
  }
  // any other module: its whole forward, one call
  nn::Linear lin(8, 5, true), twin(8, 5, true);
  twin.load_state_dict(lin.state_dict());
  twin.compile();
  const Tensor x = test::random_tensor({3, 8}, DType::f32, 7);
  compile::reset_stats();
  test::require_close(twin(x), lin(x), 1e-6, 1e-7);
  REQUIRE(compile::stats().calls == 1);
}

TEST_CASE("compile: a Llama model with compiled decoder layers matches eager, forward and backward", "[compile][llama]") {
  nn::LlamaOptions o;
  o.seed = 3;
  nn::Llama eager(test::tiny_llama_config(2), o), compiled(test::tiny_llama_config(2), o);
  std::vector<HookHandle> handles = compile::compile_llama_layers(compiled);
  const Tensor ids = random_ids(2, 9, 5);
  compile::reset_stats();
  const Tensor he = eager(ids), hc = compiled(ids);
  require_rel(hc, he, 1e-5);
  const compile::Stats fs = compile::stats();
  REQUIRE(fs.calls == 2);
  REQUIRE(fs.compilations == 2);  // one forward and one backward plan serve both layers
  REQUIRE(fs.cache_hits == 1);
  const Tensor r = test::random_tensor(he.shape(), DType::f32, 6);
  sum(he * r).backward();
  sum(hc * r).backward();
  const auto pe = eager.named_parameters(), pc = compiled.named_parameters();
  for (size_t i = 0; i < pe.size(); ++i) {
    INFO(pe[i].first);
    REQUIRE(pc[i].second.grad().defined() == pe[i].second.grad().defined());
    if (!pe[i].second.grad().defined()) continue;  // lm_head: the loss reads the hidden states
    // not bitwise: eager's fused kernels contract a*b+c into FMAs where the compiler chose to
    require_rel(pc[i].second.grad(), pe[i].second.grad(), 1e-5);
  }
  const compile::Stats s = compile::stats();
  REQUIRE(s.compilations == 2);
  REQUIRE(s.eager_calls == 0);
  REQUIRE(s.fallback_ops == 0);
  // This block compiles to 13 forward kernels: 7 matmuls (o_proj and down_proj add the residual in
  // their epilogue, as eager's layer asks them to: nothing left to fold), 2 ropes, attention (heads
  // last: no layout copy), 2 rms_norms, swiglu; and 24 backward kernels with 1 group (swiglu recomputed
  // with its backward), the input gradients summed in GEMM epilogues and in the norms' backward (the
  // autograd engine traces them so: a vjp adds what was gathered). Eager runs the same 13 forward, and
  // more backward.
  REQUIRE(s.last_forward_groups == 0);
  REQUIRE(s.last_forward_kernels == 13);
  REQUIRE(s.folded_adds == 0);
  REQUIRE(s.last_backward_groups == 1);
  REQUIRE(s.last_backward_kernels == 24);
  test::KernelCounter fwd, bwd;
  const Tensor x = test::random_tensor({2, 9, 32}, DType::f32, 8).set_requires_grad(true);
  Tensor y;
  {
    HandlerScope scope(&fwd);
    y = layer0(eager)(x);
  }
  {
    HandlerScope scope(&bwd);
    y.backward(ones_like(y));
  }
  REQUIRE(fwd.kernels == 13);
  REQUIRE(bwd.kernels - 1 > s.last_backward_kernels);  // less the ones_like seed
}

TEST_CASE("compile: 20 sequence lengths compile once; a dtype change compiles once more", "[compile][llama]") {
  nn::LlamaOptions o;
  o.seed = 7;
  nn::Llama model(test::tiny_llama_config(2), o), reference(test::tiny_llama_config(2), o);
  nn::LlamaDecoderLayer& layer = layer0(model);
  compile::CompileOptions co;
  co.dynamic_dims = {{0, 1}};  // x (B, T, hidden): T is symbolic from the first call
  HookHandle h = compile::compile_module(layer, co);
  compile::clear_caches();  // plans are shared process-wide by structure: other tests may have built this one
  compile::reset_stats();
  {
    autograd::NoGradGuard ng;
    for (int64_t t = 57; t < 77; ++t) {  // crosses the rotary table's growth at 64 positions
      const Tensor x = test::random_tensor({2, t, 32}, DType::f32, static_cast<uint64_t>(t));
      test::require_close(layer(x), layer0(reference)(x), 1e-5, 1e-6);
    }
  }
  REQUIRE(compile::stats().compilations == 1);
  REQUIRE(compile::stats().cache_hits == 19);
  REQUIRE(compile::stats().last_dynamic_sizes > 0);
  // with gradients: one forward and one backward plan for every length
  compile::reset_stats();
  for (int64_t t = 5; t < 9; ++t) {
    const Tensor x = test::random_tensor({2, t, 32}, DType::f32, static_cast<uint64_t>(t)).set_requires_grad(true);
    sum(layer(x)).backward();
    REQUIRE(x.grad().defined());
  }
  REQUIRE(compile::stats().compilations == 2);
  // another dtype is another structure: exactly one more compilation
  model.to(DType::f64);
  reference.to(DType::f64);
  compile::reset_stats();
  {
    autograd::NoGradGuard ng;
    for (int64_t t = 10; t < 14; ++t) {
      const Tensor x = test::random_tensor({2, t, 32}, DType::f64, static_cast<uint64_t>(t));
      test::require_close(layer(x), layer0(reference)(x), 1e-10, 1e-12);
    }
  }
  REQUIRE(compile::stats().compilations == 1);
  h.remove();
}

namespace {

// Trainable gradients of sum(model(ids) * r), under one seed for the random ops (LoRA dropout).
std::vector<std::pair<std::string, Tensor>> trainable_grads(nn::Llama& m, const Tensor& ids, Tensor& out) {
  manual_seed(99);
  out = m(ids);
  sum(out * test::random_tensor(out.shape(), DType::f32, 31).to(out.dtype())).backward();
  std::vector<std::pair<std::string, Tensor>> g;
  for (auto& [name, p] : m.named_trainable_parameters()) g.emplace_back(name, p.grad());
  return g;
}

void make_lora(nn::Llama& m, bool nf4) {
  if (nf4) nn::quantize_linears_nf4(m.model());
  nn::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.dropout = 0.1;
  nn::apply_lora(m, lc, 11);
  autograd::NoGradGuard g;
  int i = 0;
  for (auto& [name, t] : m.named_trainable_parameters()) copy_(t, test::random_tensor(t.shape(), t.dtype(), 40 + i++) * 0.1);
}

}  // namespace

TEST_CASE("compile: QLoRA (NF4 base, LoRA with dropout) and checkpointed layers are as exact as eager", "[compile][llama]") {
  for (const bool nf4 : {true, false}) {
    INFO((nf4 ? "NF4 base + LoRA" : "checkpointed LoRA"));
    nn::LlamaOptions o;
    o.seed = 13;
    o.checkpoint_activations = !nf4;
    nn::Llama eager(test::tiny_llama_config(2), o), compiled(test::tiny_llama_config(2), o), exact(test::tiny_llama_config(2), o);
    make_lora(eager, nf4);
    make_lora(compiled, nf4);
    // the reference: the same model in f64 (NF4 weights dequantised into plain linears)
    make_lora(exact, false);
    if (nf4) {
      autograd::NoGradGuard ng;
      for (auto& [path, m] : eager.named_modules())
        if (auto* q = dynamic_cast<nn::NF4Linear*>(m)) copy_(exact.find_module(path)->parameter("weight"), q->dequantized_weight(DType::f32));
    }
    exact.to(DType::f64);
    auto handles = compile::compile_llama_layers(compiled);
    const Tensor ids = random_ids(2, 7, 12);
    compile::reset_stats();
    Tensor he, hc, hx;
    const auto ge = trainable_grads(eager, ids, he);
    const auto gc = trainable_grads(compiled, ids, hc);
    const auto gx = trainable_grads(exact, ids, hx);
    require_rel(hc, he, 1e-5);
    REQUIRE(ge.size() == gc.size());
    // Gradients of a small random model are ill-conditioned (eager f32 itself is ~1e-4 off f64 on
    // some): the compiled ones must be as close to the f64 reference as eager's are.
    for (size_t i = 0; i < ge.size(); ++i) {
      INFO(ge[i].first);
      REQUIRE(gc[i].second.defined());
      const Tensor x = gx[i].second.to(DType::f64);
      const double scale = amax(abs(x)).item<double>();
      const double err_eager = amax(abs(ge[i].second.to(DType::f64) - x)).item<double>();
      const double err_compiled = amax(abs(gc[i].second.to(DType::f64) - x)).item<double>();
      INFO("scale " << scale << " eager error " << err_eager << " compiled error " << err_compiled);
      REQUIRE(err_compiled <= 8 * err_eager + 1e-6 * scale);
    }
    const compile::Stats s = compile::stats();
    REQUIRE(s.eager_calls == 0);
    REQUIRE(s.calls >= 2);
    REQUIRE(s.last_backward_kernels > 0);
  }
}

TEST_CASE("compile: compiled layers checkpointed with offload (attention output kept) match plain checkpoints", "[compile][llama]") {
  using A = nn::LayerActivations;
  nn::LlamaOptions o;
  o.seed = 17;
  nn::Llama plain(test::tiny_llama_config(3), o), offloaded(test::tiny_llama_config(3), o);
  make_lora(plain, true);
  make_lora(offloaded, true);
  plain.set_checkpoint_activations(true);
  offloaded.set_layer_activations({A::offload, A::offload, A::keep});
  auto hp = compile::compile_llama_layers(plain);
  auto ho = compile::compile_llama_layers(offloaded);
  const Tensor ids = random_ids(2, 11, 18);
  Tensor yp, yo;
  const auto gp = trainable_grads(plain, ids, yp);
  const auto go = trainable_grads(offloaded, ids, yo);
  require_rel(yo, yp, 1e-6);
  REQUIRE(gp.size() == go.size());
  for (size_t i = 0; i < gp.size(); ++i) {
    INFO(gp[i].first);
    require_rel(go[i].second, gp[i].second, 1e-5);
  }
}

TEST_CASE("compile: a checkpointed compiled QLoRA layer's recompute leaves out down_proj", "[compile][llama]") {
  // A decoder layer returns residual + down_proj(...), which its backward never reads: the recompute
  // runs the plan of what the backward keeps, so down_proj's dequantisation and GEMMs do not run again.
  nn::LlamaOptions o;
  o.seed = 19;
  nn::Llama kept(test::tiny_llama_config(2), o), checkpointed(test::tiny_llama_config(2), o);
  make_lora(kept, true);
  make_lora(checkpointed, true);
  checkpointed.set_checkpoint_activations(true);
  auto hk = compile::compile_llama_layers(kept);
  auto hc = compile::compile_llama_layers(checkpointed);
  const Tensor ids = random_ids(2, 9, 20);
  auto run = [&](nn::Llama& m, std::vector<Tensor>& grads) {
    manual_seed(99);
    const Tensor y = m(ids);
    const Tensor seed = test::random_tensor(y.shape(), DType::f32, 21);  // d loss / d logits
    test::KernelCounter counter;
    {
      HandlerScope scope(&counter);
      autograd::backward({y}, {seed});
    }
    for (auto& [name, p] : m.named_trainable_parameters()) grads.push_back(p.grad());
    return counter;
  };
  std::vector<Tensor> gk, gc;
  compile::reset_stats();
  const test::KernelCounter k = run(kept, gk), c = run(checkpointed, gc);
  REQUIRE(compile::stats().eager_calls == 0);
  // 7 NF4 linears a layer; the recompute dequantises q, k, v, o, gate and up, not down.
  CHECK(c.count("nf4_dequantize") - k.count("nf4_dequantize") == 2 * 6);
  REQUIRE(gk.size() == gc.size());
  for (size_t i = 0; i < gk.size(); ++i) {
    INFO("trainable parameter " << i);
    require_rel(gc[i], gk[i], 1e-6);
  }
}

TEST_CASE("compile: the Trainer's compile seam compiles a Llama's layers and keeps its loss", "[compile][llama]") {
  nn::LlamaOptions o;
  o.seed = 21;
  nn::Llama eager(test::tiny_llama_config(2), o), compiled(test::tiny_llama_config(2), o);
  const train::BatchLossFn loss = train::llama_loss(true);
  const train::BatchLossFn compiled_loss = compile::trainer_compile()(compiled, loss);
  data::Batch b;
  b.input_ids = random_ids(2, 8, 22);
  b.labels = random_ids(2, 8, 23);
  b.n_loss_tokens = 16;
  compile::reset_stats();
  const Tensor le = loss(eager, b), lc = compiled_loss(compiled, b);
  REQUIRE(compile::stats().calls == 2);  // both decoder layers ran compiled
  require_rel(lc, le, 1e-5);
  le.backward();
  lc.backward();
  const auto pe = eager.named_parameters(), pc = compiled.named_parameters();
  for (size_t i = 0; i < pe.size(); ++i) {
    INFO(pe[i].first);
    require_rel(pc[i].second.grad(), pe[i].second.grad(), 1e-5);
  }
  nn::Module plain;
  REQUIRE_THROWS_WITH(compile::trainer_compile()(plain, loss), ContainsSubstring("nn::Llama"));
}

TEST_CASE("compile: layers holding a Function whose backward cannot be traced (MLP chunks) run eagerly", "[compile][llama]") {
  nn::LlamaOptions o;
  o.seed = 19;
  nn::Llama eager(test::tiny_llama_config(2), o), compiled(test::tiny_llama_config(2), o);
  make_lora(eager, true);
  make_lora(compiled, true);
  eager.set_mlp_chunk(4);  // 11 tokens: pieces of 4, 4 and 3
  compiled.set_mlp_chunk(4);
  auto handles = compile::compile_llama_layers(compiled);
  const Tensor ids = random_ids(2, 11, 20);
  Tensor he, hc;
  const auto ge = trainable_grads(eager, ids, he);
  compile::reset_stats();
  const auto gc = trainable_grads(compiled, ids, hc);
  // The chunks' backward runs a nested backward per piece, which a trace cannot follow: the layers
  // run eagerly, with eager's results.
  CHECK(compile::stats().eager_calls == 2);
  require_rel(hc, he, 1e-5);
  REQUIRE(ge.size() == gc.size());
  for (size_t i = 0; i < ge.size(); ++i) {
    INFO(ge[i].first);
    require_rel(gc[i].second, ge[i].second, 1e-4);
  }
}

// The hooks dist/ and compile/ build on: Module forward hooks (pre, wrapper, post, removal, Llama
// calling its layers through them), autograd's post-accumulate-grad hooks and end-of-backward
// callbacks (plain, accumulated, checkpointed), and a dispatch handler that traces a Llama block's
// forward and backward without running a kernel.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <map>
#include <random>

#include "autograd/checkpoint.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/hooks.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "nn/layers.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

std::shared_ptr<nn::Llama> tiny_lora_llama(bool checkpointing, uint64_t seed) {
  nn::LlamaOptions o;
  o.seed = seed;
  o.checkpoint_activations = checkpointing;
  auto m = std::make_shared<nn::Llama>(test::tiny_llama_config(3), o);
  nn::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  nn::apply_lora(*m, lc, seed + 1);
  // B starts at zero in LoRA; make it random so gradients reach A too.
  autograd::NoGradGuard g;
  int i = 0;
  for (auto& [name, t] : m->named_trainable_parameters()) copy_(t, test::random_tensor(t.shape(), t.dtype(), seed + 10 + i++));
  return m;
}

Tensor random_ids(int64_t b, int64_t t, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int64_t> ids(static_cast<size_t>(b * t));
  for (auto& id : ids) id = static_cast<int64_t>(gen() % 41);
  return from_vector<int64_t>(ids, {b, t});
}

Tensor lm_loss(nn::Llama& m, const Tensor& ids) {
  Tensor h = m(ids);
  return m.loss(h, ids, Reduction::mean);
}

}  // namespace

// ---- Module forward hooks

TEST_CASE("hooks: forward pre hooks, wrappers and post hooks run in order and can be removed", "[hooks][module]") {
  auto lin = std::make_shared<nn::Linear>(6, 5, true);
  Tensor x = test::random_tensor({3, 6}, DType::f32, 11);
  const Tensor plain = (*lin)(x);
  test::require_close(plain, lin->forward(x));

  std::vector<std::string> order;
  kiln::HookHandle pre = lin->register_forward_pre_hook([&](nn::Module&, nn::Module::ForwardCall& call) {
    order.push_back("pre");
    call.inputs[0] = mul(call.inputs[0], 2.0);  // replaces the input
  });
  kiln::HookHandle inner = lin->register_forward_wrapper(
      [&](nn::Module&, const nn::Module::ForwardCall& call, const nn::Module::ForwardFn& next) {
        order.push_back("inner");
        return next(call.inputs);
      });
  kiln::HookHandle outer = lin->register_forward_wrapper(
      [&](nn::Module&, const nn::Module::ForwardCall& call, const nn::Module::ForwardFn& next) {
        order.push_back("outer");
        std::vector<Tensor> out = next(call.inputs);
        out[0] = add(out[0], 1.0);
        return out;
      });
  kiln::HookHandle post = lin->register_forward_post_hook(
      [&](nn::Module&, const nn::Module::ForwardCall& call, std::vector<Tensor>& outputs) {
        order.push_back("post");
        REQUIRE(call.inputs.size() == 1);
        outputs[0] = neg(outputs[0]);  // replaces the output
      });
  REQUIRE(lin->has_forward_hooks());
  const Tensor hooked = (*lin)(x);
  REQUIRE(order == std::vector<std::string>{"pre", "outer", "inner", "post"});
  test::require_close(hooked, neg(add(lin->forward(mul(x, 2.0)), 1.0)));

  pre.remove();
  outer.remove();
  outer.remove();  // twice: nothing
  order.clear();
  test::require_close((*lin)(x), neg(plain));
  REQUIRE(order == std::vector<std::string>{"inner", "post"});
  inner.remove();
  post.remove();
  REQUIRE_FALSE(lin->has_forward_hooks());
  test::require_close((*lin)(x), plain);
  REQUIRE_THROWS_WITH(lin->register_forward_pre_hook(nullptr), ContainsSubstring("[register_forward_pre_hook]"));
}

TEST_CASE("hooks: Llama calls every layer through its hooks, again when a checkpointed block recomputes", "[hooks][module]") {
  for (bool checkpointing : {false, true}) {
    CAPTURE(checkpointing);
    auto m = tiny_lora_llama(checkpointing, 5);
    std::map<std::string, int> calls;  // module path -> pre-hook calls
    std::vector<std::string> keys;
    std::vector<kiln::HookHandle> handles;
    for (auto& [name, mod] : m->named_modules()) {
      if (name.empty()) continue;
      const std::string n = name;
      handles.push_back(mod->register_forward_pre_hook([&calls, &keys, n](nn::Module& self, nn::Module::ForwardCall& call) {
        ++calls[n];
        if (self.type_name() == "LlamaDecoderLayer") keys.push_back(call.key);
      }));
    }
    Tensor ids = random_ids(2, 7, 3);
    Tensor loss = lm_loss(*m, ids);
    const int layers = 3;
    REQUIRE(calls["model"] == 1);
    REQUIRE(calls["model.embed_tokens"] == 1);
    REQUIRE(calls["model.norm"] == 1);
    for (int i = 0; i < layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i);
      REQUIRE(calls[p] == 1);
      REQUIRE(calls[p + ".self_attn"] == 1);
      REQUIRE(calls[p + ".mlp"] == 1);
      REQUIRE(calls[p + ".self_attn.q_proj"] == 1);         // the LoRA wrapper
      REQUIRE(calls[p + ".self_attn.q_proj.base_layer"] == 1);  // and the base it calls
      REQUIRE(calls[p + ".mlp.down_proj"] == 1);
    }
    REQUIRE(keys.size() == layers);
    REQUIRE(keys[0] == "start=0 cache=none");
    loss.backward();
    for (int i = 0; i < layers; ++i) {  // checkpoint recomputes each block once in backward
      REQUIRE(calls["model.layers." + std::to_string(i)] == (checkpointing ? 2 : 1));
      REQUIRE(calls["model.layers." + std::to_string(i) + ".mlp.up_proj"] == (checkpointing ? 2 : 1));
    }
    REQUIRE(calls["model.embed_tokens"] == 1);
  }
}

TEST_CASE("hooks: a forward wrapper can replace a decoder layer's computation", "[hooks][module]") {
  auto m = tiny_lora_llama(false, 8);
  Tensor ids = random_ids(1, 5, 9);
  const Tensor reference = (*m)(ids);
  // The wrapper runs the layer twice and keeps the second result: same values, and proof it ran.
  int runs = 0;
  auto& layer = m->model().child_as<nn::ModuleList>("layers").at<nn::LlamaDecoderLayer>(1);
  kiln::HookHandle h = layer.register_forward_wrapper(
      [&](nn::Module&, const nn::Module::ForwardCall& call, const nn::Module::ForwardFn& next) {
        next(call.inputs);
        ++runs;
        return next(call.inputs);
      });
  test::require_close((*m)(ids), reference);
  REQUIRE(runs == 1);
  // Skipping the layer changes the result.
  h.remove();
  kiln::HookHandle skip = layer.register_forward_wrapper(
      [](nn::Module&, const nn::Module::ForwardCall& call, const nn::Module::ForwardFn&) { return call.inputs; });
  REQUIRE(amax(abs(sub((*m)(ids), reference))).item<float>() > 1e-4f);
}

// ---- autograd hooks

TEST_CASE("hooks: post-accumulate-grad hooks fire once per leaf per backward, after every contribution", "[hooks][autograd]") {
  Tensor w = test::random_tensor({4, 3}, DType::f64, 21).set_requires_grad(true);
  Tensor b = test::random_tensor({3}, DType::f64, 22).set_requires_grad(true);
  Tensor x = test::random_tensor({5, 4}, DType::f64, 23);
  std::vector<std::string> events;
  Tensor w_grad_at_hook;
  kiln::HookHandle hw = autograd::register_post_accumulate_grad_hook(w, [&](const Tensor& leaf) {
    events.push_back("w");
    REQUIRE_FALSE(autograd::grad_enabled());
    w_grad_at_hook = leaf.grad().clone();
    autograd::queue_callback([&] { events.push_back("end"); });
  });
  kiln::HookHandle hb = autograd::register_post_accumulate_grad_hook(b, [&](const Tensor&) { events.push_back("b"); });
  // w is used three times: its hook must wait for all three contributions.
  auto loss_of = [&] {
    Tensor y = add(matmul(x, w), b);                        // (5, 3)
    Tensor z = add(matmul(tanh(y), transpose(w, 0, 1)), 0.5);  // (5, 4)
    return add(sum(mul(z, z)), sum(mul(w, w)));
  };
  loss_of().backward();
  REQUIRE(std::count(events.begin(), events.end(), "w") == 1);
  REQUIRE(std::count(events.begin(), events.end(), "b") == 1);
  REQUIRE(events.back() == "end");  // the queued callback runs last, once
  REQUIRE(std::count(events.begin(), events.end(), "end") == 1);
  test::require_equal(w_grad_at_hook, w.grad());
  const Tensor g1 = w.grad().clone();

  // Gradient accumulation: a second backward fires again, with .grad holding the running sum.
  events.clear();
  loss_of().backward();
  REQUIRE(events == std::vector<std::string>{events[0], events[1], "end"});
  REQUIRE(std::count(events.begin(), events.end(), "w") == 1);
  test::require_close(w_grad_at_hook, mul(g1, 2.0), 1e-12, 1e-12);

  // autograd::grad accumulates nothing and fires nothing; a removed hook stays quiet.
  events.clear();
  autograd::grad({loss_of()}, {w});
  REQUIRE(events.empty());
  hw.remove();
  loss_of().backward();
  REQUIRE(events == std::vector<std::string>{"b"});
  hb.remove();

  REQUIRE_THROWS_WITH(autograd::queue_callback([] {}), ContainsSubstring("[queue_callback] called outside a backward"));
  Tensor nonleaf = mul(w, 2.0);
  REQUIRE_THROWS_WITH(autograd::register_post_accumulate_grad_hook(nonleaf, [](const Tensor&) {}),
                      ContainsSubstring("non-leaf"));
}

TEST_CASE("hooks: every LoRA parameter of a checkpointed Llama gets one hook call per backward, in reverse layer order", "[hooks][autograd]") {
  for (bool checkpointing : {false, true}) {
    CAPTURE(checkpointing);
    auto m = tiny_lora_llama(checkpointing, 13);
    std::map<std::string, int> fired;
    std::vector<std::string> order;
    std::map<std::string, Tensor> grad_at_hook;
    int callbacks = 0;
    bool queued = false;  // one callback per backward, queued by the first hook that fires
    std::vector<kiln::HookHandle> handles;
    for (auto& [name, p] : m->named_trainable_parameters()) {
      const std::string n = name;
      handles.push_back(autograd::register_post_accumulate_grad_hook(p, [&, n](const Tensor& leaf) {
        ++fired[n];
        if (!queued) {
          queued = true;
          autograd::queue_callback([&] { ++callbacks; queued = false; });
        }
        order.push_back(n);
        grad_at_hook[n] = leaf.grad().clone();
      }));
    }
    Tensor ids = random_ids(2, 6, 17);
    lm_loss(*m, ids).backward();
    for (auto& [name, p] : m->named_trainable_parameters()) {
      CAPTURE(name);
      REQUIRE(fired[name] == 1);
      test::require_equal(grad_at_hook[name], p.grad());  // complete when the hook ran
    }
    REQUIRE(callbacks == 1);
    // Backward reaches the last layer first: every layer-2 parameter completes before any layer-0 one.
    auto first_of = [&](const std::string& layer) {
      return std::find_if(order.begin(), order.end(), [&](const std::string& n) { return n.find(layer) != std::string::npos; }) - order.begin();
    };
    auto last_of = [&](const std::string& layer) {
      return order.rend() - std::find_if(order.rbegin(), order.rend(), [&](const std::string& n) { return n.find(layer) != std::string::npos; });
    };
    REQUIRE(last_of("layers.2.") <= first_of("layers.0."));
    // Accumulating a second micro-batch fires every hook once more.
    lm_loss(*m, random_ids(2, 6, 18)).backward();
    for (auto& [name, p] : m->named_trainable_parameters()) REQUIRE(fired[name] == 2);
    REQUIRE(callbacks == 2);
  }
}

// ---- dispatch handlers

namespace {

// Records every op and hands out placeholders (tensors without data) instead of running kernels;
// views pass through (they only alias).
struct Tracer : DispatchHandler {
  std::vector<std::string> ops;
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (op->is_view()) return dispatch_next(op, inputs);
    ops.push_back(op->name());
    std::vector<Tensor> out;
    for (const TensorMeta& m : op->infer(inputs)) out.push_back(placeholder(m.shape, m.dtype, m.device));
    return out;
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>&, std::vector<Tensor>&) override {
    ops.push_back(op->name());
  }
  int count(const std::string& name) const { return static_cast<int>(std::count(ops.begin(), ops.end(), name)); }
};


}  // namespace

TEST_CASE("hooks: a dispatch handler traces a Llama block's forward and backward without running a kernel", "[hooks][dispatch]") {
  nn::LlamaOptions o;
  o.seed = 31;
  nn::Llama model(test::tiny_llama_config(3), o);
  auto& block = model.model().child_as<nn::ModuleList>("layers").at<nn::LlamaDecoderLayer>(0);
  (void)model(random_ids(1, 16, 4));  // real run first: fills the rotary tables for up to 16 positions

  test::KernelCounter counter;
  HandlerScope count_scope(&counter);
  {
    test::KernelCounter probe;  // sanity: the counter sees kernels when nothing intercepts
    HandlerScope s(&probe);
    (void)add(test::random_tensor({3}, DType::f32, 1), 1.0);
    REQUIRE(probe.kernels >= 1);
  }
  counter.kernels = 0;

  Tracer tracer;
  Tensor x = placeholder({2, 9, 32}, DType::f32, kCPU).set_requires_grad(true);
  Tensor y;
  {
    HandlerScope trace_scope(&tracer);
    y = block(x);
  }
  REQUIRE(counter.kernels == 0);
  REQUIRE(y.shape() == Shape{2, 9, 32});
  REQUIRE_FALSE(static_cast<bool>(y.storage()));
  REQUIRE(y.requires_grad());  // autograd recorded the traced ops
  // q, k, v, o, gate, up, down projections (o and down add the residual stream in their epilogue: no add
  // op); two norms; rope on q and k; one attention; SwiGLU.
  REQUIRE(tracer.count("matmul") == 7);
  REQUIRE(tracer.count("rms_norm") == 2);
  REQUIRE(tracer.count("rotary_embedding") == 2);
  REQUIRE(tracer.count("scaled_dot_product_attention") == 1);
  REQUIRE(tracer.count("swiglu") == 1);
  REQUIRE(tracer.count("add") == 0);

  // Backward goes through the same dispatch point: the vjps are traced too, still without kernels.
  const size_t forward_ops = tracer.ops.size();
  {
    HandlerScope trace_scope(&tracer);
    y.backward(placeholder(y.shape(), y.dtype(), y.device()));
  }
  REQUIRE(counter.kernels == 0);
  REQUIRE(tracer.ops.size() > forward_ops);
  const std::vector<std::string> bwd(tracer.ops.begin() + static_cast<long>(forward_ops), tracer.ops.end());
  auto in_bwd = [&](const std::string& n) { return std::count(bwd.begin(), bwd.end(), n); };
  REQUIRE(in_bwd("rms_norm_backward") == 2);
  REQUIRE(in_bwd("swiglu_backward") == 1);
  REQUIRE(in_bwd("sdpa_backward") == 1);
  REQUIRE(in_bwd("matmul") >= 14);  // dX and dW of the 7 projections
  REQUIRE(x.grad().defined());
  REQUIRE_FALSE(static_cast<bool>(x.grad().storage()));

  // Outside the scope ops run normally again.
  REQUIRE(add(test::random_tensor({2}, DType::f32, 2), 1.0).storage() != nullptr);
  REQUIRE(counter.kernels >= 1);
}

TEST_CASE("hooks: ops a handler dispatches itself see only the handlers below it", "[hooks][dispatch]") {
  struct Doubler : DispatchHandler {
    int seen = 0;
    std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
      ++seen;
      if (std::string(op->name()) != "exp") return dispatch_next(op, inputs);
      // exp(x) is replaced by 2 * exp(x); the mul and exp dispatched here do not come back to us.
      return {mul(dispatch_next(op, inputs)[0], 2.0)};
    }
  };
  test::KernelCounter counter;
  HandlerScope c(&counter);
  Doubler d;
  Tensor x = test::random_tensor({4}, DType::f64, 3);
  const Tensor ref = exp(x);
  Tensor got;
  {
    HandlerScope s(&d);
    got = exp(x);
  }
  test::require_close(got, mul(ref, 2.0));
  REQUIRE(d.seen == 1);
  REQUIRE(counter.kernels >= 3);  // exp (reference), exp and mul inside the handler

  // Gradients flow through replaced ops: autograd records the op as dispatched (exp), whatever ran it.
  Tensor w = test::random_tensor({4}, DType::f64, 4).set_requires_grad(true);
  {
    HandlerScope s(&d);
    Tensor e = exp(w);
    REQUIRE(e.grad_fn() != nullptr);
  }
}

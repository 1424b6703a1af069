// Memory accounting (memory_usage on the CPU and CUDA), per-layer activation checkpointing in
// nn::Llama, and the memory-budget planner: at several budgets the plan fits, keeps more layers as
// the budget grows, and the real peak of training steps stays within the budget and near the prediction.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>

#include "core/cuda/runtime.h"
#include "core/memory.h"
#include "nn/lora.h"
#include "nn/memory_plan.h"
#include "nn/nf4_linear.h"
#include "nn/optim.h"
#include "tests/helpers.h"
#include "train/trainer.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

constexpr size_t kMiB = size_t{1} << 20;

// The CPU allocator rounds every allocation up to 64 bytes.
size_t cpu_bytes(size_t n) { return (n + 63) / 64 * 64; }

// Loss and gradients of every trainable parameter after one forward + backward.
struct Step {
  double loss = 0;
  std::vector<Tensor> grads;
};

Step loss_and_grads(nn::Llama& m, const Tensor& ids, const Tensor& targets) {
  for (auto& [name, p] : m.named_parameters()) p.zero_grad();
  Tensor loss = m.chunked_loss(m(ids), targets);
  loss.backward();
  Step s{loss.item<double>(), {}};
  for (auto& [name, p] : m.named_trainable_parameters()) s.grads.push_back(p.grad());
  return s;
}

int64_t numel_of(const nn::NamedTensors& params) {
  int64_t n = 0;
  for (const auto& [name, p] : params) n += p.numel();
  return n;
}

// A Llama as QLoRA trains it: NF4 base, LoRA r 8 on every linear layer, training mode.
using ModelFactory = std::function<std::shared_ptr<nn::Llama>()>;

std::shared_ptr<nn::Llama> qlora(const nn::LlamaConfig& config, Device device, DType dtype) {
  nn::LlamaOptions lo;
  lo.seed = 3;
  lo.dtype = dtype;
  lo.device = device;
  lo.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto model = std::make_shared<nn::Llama>(config, lo);
  nn::LoraConfig lc;
  lc.r = 8;
  lc.alpha = 16;
  nn::apply_lora(*model, lc, 4);
  model->train();
  return model;
}

// The tiny named Llama (4 layers, hidden 256, vocab 4096, tied embeddings).
std::shared_ptr<nn::Llama> tiny_qlora(Device device, DType dtype) {
  return qlora(nn::LlamaConfig::named("tiny"), device, dtype);
}

struct BudgetRun {
  nn::MemoryPlan plan;
  size_t actual_peak = 0;
};

// A Trainer with memory_budget = budget on a fresh model: its plan, and the peak of two training
// steps (the second with the optimizer state) measured from after planning.
BudgetRun train_within(const ModelFactory& make, size_t budget, int64_t batch, int64_t seq, size_t host_budget = 0) {
  auto model = make();
  const Device device = model->lm_head_weight().device();
  nn::AdamW opt(model->named_trainable_parameters());
  data::PackOptions po;
  po.batch_size = batch;
  po.seq_len = seq;
  data::PackedDataset stream(test::random_documents(400, 5, model->config().vocab_size), po);
  train::TrainerOptions o;
  o.device = device;
  o.memory_budget = budget;
  o.memory_plan_options.host_budget_bytes = host_budget;
  train::Trainer trainer(*model, opt, stream, o);
  REQUIRE(trainer.memory_plan().has_value());
  BudgetRun r{*trainer.memory_plan(), 0};
  reset_peak_memory(device);
  REQUIRE(trainer.train_step().has_value());
  REQUIRE(trainer.train_step().has_value());
  if (device.is_cuda()) cuda::synchronize();
  r.actual_peak = memory_usage(device).peak;
  return r;
}

// The several-budgets check (B * T must exceed kMinLossChunk): from the smallest budget that fits
// (every layer checkpointed, or in segments) through one where every layer is kept and the head runs in chunks, to
// the peak of the plan without checkpointing and one chunk, each plan fits, keeps at least as many
// layers whole as the smaller budget's, and two real training steps peak within the budget and
// within 15% of the prediction. Prints one line per budget.
void check_budgets(const ModelFactory& make, int64_t batch, int64_t seq) {
  size_t minimum = 0, roomy = 0, logit_bytes = 0, dense = 0;
  {
    auto model = make();
    const Tensor head = model->lm_head_weight();
    logit_bytes = nn::chunked_loss_bytes_per_token(model->config().vocab_size, head.dtype(), true);
    nn::AdamW opt(model->named_trainable_parameters());
    nn::MemoryPlanOptions mo;
    mo.batch_size = batch;
    mo.seq_len = seq;
    mo.budget_bytes = size_t{1} << 50;
    mo.optimizer_state_bytes = opt.pending_state_bytes();
    const nn::MemoryPlan free_plan = nn::plan_memory(*model, mo);
    CHECK(free_plan.num_checkpointed() == 0);
    CHECK(free_plan.loss_chunk == batch * seq);
    CHECK(free_plan.dequantized_layers == (free_plan.dequantized_bytes > 0 ? model->config().num_hidden_layers : 0));
    minimum = free_plan.minimum_budget_bytes;
    dense = free_plan.dequantized_bytes;
    roomy = free_plan.predicted_peak_bytes - dense;  // the budgets below may hold some of those too
    REQUIRE(minimum < roomy);
  }
  std::vector<size_t> budgets;
  for (int k = 0; k <= 4; ++k) budgets.push_back(minimum + (roomy - minimum) * static_cast<size_t>(k) / 4);
  // Every layer kept, the head in chunks: the logits of half the tokens past the smallest chunk less.
  const size_t chunked = roomy - static_cast<size_t>(batch * seq - nn::kMinLossChunk) / 2 * logit_bytes;
  REQUIRE(chunked > minimum);
  budgets.push_back(chunked);
  if (dense > 0) budgets.push_back(roomy + dense);  // and every layer's NF4 weights kept dequantised
  std::sort(budgets.begin(), budgets.end());
  int64_t last_checkpointed = -1;
  for (size_t budget : budgets) {
    const BudgetRun r = train_within(make, budget, batch, seq);
    const double predicted = static_cast<double>(r.plan.predicted_peak_bytes);
    const double actual = static_cast<double>(r.actual_peak);
    std::printf("[memory_plan] %s, batch %lld x %lld: budget %.2f MiB: %lld of %zu layers checkpointed, %lld dequantised, "
                "chunk %lld, predicted %.2f MiB at %s, actual %.2f MiB (%+.1f%%)\n",
                r.plan.device.str().c_str(), static_cast<long long>(batch), static_cast<long long>(seq),
                static_cast<double>(budget) / kMiB, static_cast<long long>(r.plan.num_checkpointed()),
                r.plan.layer_activations.size(), static_cast<long long>(r.plan.dequantized_layers),
                static_cast<long long>(r.plan.loss_chunk), predicted / kMiB,
                r.plan.peak_at.c_str(), actual / kMiB, 100.0 * (actual - predicted) / predicted);
    if (r.plan.device.is_cuda()) std::printf("%s\n", r.plan.describe().c_str());
    INFO(r.plan.describe());
    CHECK(r.plan.predicted_peak_bytes <= budget);
    CHECK(r.actual_peak <= budget);
    CHECK(std::abs(actual - predicted) <= 0.15 * predicted);
    // The smallest budget takes the plan of least memory: on the tiny Llama every layer checkpointed;
    // on two 8B layers only the lower one (a checkpointed top layer recomputes at the peak).
    if (budget == budgets.front()) CHECK(r.plan.predicted_peak_bytes == minimum);
    if (budget == chunked) {  // all kept, the chunk shrunk to fit
      CHECK(r.plan.num_checkpointed() == 0);
      CHECK(r.plan.peak_at == "the loss head");
      CHECK(r.plan.loss_chunk >= nn::kMinLossChunk);
      CHECK(r.plan.loss_chunk < batch * seq);
    }
    if (budget == budgets.back()) CHECK(r.plan.loss_chunk == batch * seq);  // one chunk
    if (dense > 0 && budget == roomy + dense)
      CHECK(r.plan.dequantized_layers == static_cast<int64_t>(r.plan.layer_activations.size()));
    if (last_checkpointed >= 0) CHECK(r.plan.num_checkpointed() <= last_checkpointed);
    last_checkpointed = r.plan.num_checkpointed();
  }
  CHECK(last_checkpointed == 0);
}

}  // namespace

TEST_CASE("memory_usage counts the CPU allocator's bytes now and at the peak", "[memory_plan]") {
  reset_peak_memory(kCPU);
  const size_t base = memory_usage(kCPU).allocated;
  CHECK(memory_usage(kCPU).peak == base);
  {
    Tensor a = empty({1000}, DType::f32);  // 4000 bytes
    CHECK(memory_usage(kCPU).allocated == base + cpu_bytes(4000));
    { Tensor b = empty({1 << 18}, DType::f64); }  // 2 MiB, freed at once
    const MemoryUsage u = memory_usage(kCPU);
    CHECK(u.allocated == base + cpu_bytes(4000));
    CHECK(u.peak == base + cpu_bytes(4000) + 2 * kMiB);
  }
  CHECK(memory_usage(kCPU).allocated == base);
  CHECK(memory_usage(kCPU).peak == base + cpu_bytes(4000) + 2 * kMiB);
  reset_peak_memory(kCPU);
  CHECK(memory_usage(kCPU).peak == base);
  // A view of memory owned elsewhere is not kiln's allocation.
  std::vector<float> host(1024);
  Tensor view = from_blob(host.data(), {1024}, DType::f32, kCPU);
  CHECK(memory_usage(kCPU).allocated == base);
  CHECK(free_memory(kCPU) > 0);
  CHECK(nn::default_memory_budget(kCPU) < memory_usage(kCPU).allocated + free_memory(kCPU));
}

TEST_CASE("memory_usage counts the CUDA caching allocator's bytes now and at the peak", "[memory_plan][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Device gpu("cuda:0");
  cuda::synchronize();
  cuda::empty_cache();
  reset_peak_memory(gpu);
  const size_t base = memory_usage(gpu).allocated;
  // The allocator counts whole blocks: a cached block up to 1 MiB larger than asked may serve a request.
  auto between = [](size_t v, size_t lo) { return v >= lo && v <= lo + kMiB; };
  {
    Tensor a = empty({1 << 20}, DType::f32, gpu);  // 4 MiB
    const size_t with_a = memory_usage(gpu).allocated;
    CHECK(between(with_a - base, 4 * kMiB));
    { Tensor b = empty({1 << 20}, DType::f64, gpu); }  // 8 MiB, freed at once
    CHECK(memory_usage(gpu).allocated == with_a);
    CHECK(between(memory_usage(gpu).peak - with_a, 8 * kMiB));
  }
  CHECK(memory_usage(gpu).allocated == base);
  reset_peak_memory(gpu);
  CHECK(memory_usage(gpu).peak == base);
  CHECK(free_memory(gpu) > 0);
  CHECK(nn::default_memory_budget(gpu) < memory_usage(gpu).allocated + free_memory(gpu));
}

TEST_CASE("Llama: per-layer checkpointing gives the loss and gradients of none and all and keeps less", "[memory_plan][llama]") {
  nn::LlamaOptions lo;
  lo.seed = 11;
  nn::Llama m(test::tiny_llama_config(4), lo);
  m.train();
  Generator gen(12);
  const Tensor ids_ok = randint(0, 41, {2, 24}, DType::i64, kCPU, &gen);   // (2, 24)
  const Tensor targets = randint(0, 41, {2, 24}, DType::i64, kCPU, &gen);  // (2, 24)
  using A = nn::LayerActivations;
  REQUIRE(m.layer_activations() == std::vector<A>(4, A::keep));
  const Step none = loss_and_grads(m, ids_ok, targets);
  m.set_checkpoint_activations(true);
  REQUIRE(m.layer_activations() == std::vector<A>(4, A::checkpoint));
  const Step all = loss_and_grads(m, ids_ok, targets);
  m.set_layer_activations({A::checkpoint, A::keep, A::checkpoint, A::keep});
  const Step some = loss_and_grads(m, ids_ok, targets);
  // Offloaded on the CPU: the input is already in host memory and is kept as it is.
  m.set_layer_activations({A::offload, A::offload, A::keep, A::checkpoint});
  const Step offloaded = loss_and_grads(m, ids_ok, targets);
  // Segments: layers 0-2 run again from layer 0's input; 0 and 1-3 (layer 1's input offloaded).
  m.set_layer_activations({A::checkpoint, A::segment, A::segment, A::keep});
  const Step segment = loss_and_grads(m, ids_ok, targets);
  m.set_layer_activations({A::checkpoint, A::offload, A::segment, A::segment});
  const Step segments = loss_and_grads(m, ids_ok, targets);
  for (const Step* s : {&all, &some, &offloaded, &segment, &segments}) {
    CHECK(std::abs(s->loss - none.loss) <= 1e-6 * std::abs(none.loss));
    REQUIRE(s->grads.size() == none.grads.size());
    for (size_t i = 0; i < none.grads.size(); ++i) test::require_close(s->grads[i], none.grads[i], 1e-6, 1e-7);
  }
  // What forward keeps for backward shrinks with every layer checkpointed.
  auto kept_after_forward = [&](std::vector<A> activations) {
    m.set_layer_activations(std::move(activations));
    const size_t before = memory_usage(kCPU).allocated;
    Tensor h = m(ids_ok);
    return memory_usage(kCPU).allocated - before;
  };
  const size_t k0 = kept_after_forward({A::keep, A::keep, A::keep, A::keep});
  const size_t k2 = kept_after_forward({A::checkpoint, A::checkpoint, A::keep, A::keep});
  const size_t k4 = kept_after_forward({A::checkpoint, A::checkpoint, A::checkpoint, A::checkpoint});
  CHECK(k0 > k2);
  CHECK(k2 > k4);
  CHECK(k0 - k2 == (k2 - k4));  // two layers' saved tensors less their outputs each time
  // One segment of all four keeps the last output only: three layer outputs less than all checkpointed.
  const size_t k1 = kept_after_forward({A::checkpoint, A::segment, A::segment, A::segment});
  CHECK(k4 > k1);
  CHECK((k4 - k1) % 3 == 0);
  // A segment starts at a checkpointed or offloaded layer.
  CHECK_THROWS_WITH(m.set_layer_activations({A::segment, A::checkpoint, A::keep, A::keep}),
                    ContainsSubstring("decoder layer 0 is marked segment but is the first layer"));
  CHECK_THROWS_WITH(m.set_layer_activations({A::checkpoint, A::keep, A::segment, A::keep}),
                    ContainsSubstring("decoder layer 2 is marked segment but layer 1 below it is kept whole"));
  CHECK(m.layer_activations() == std::vector<A>{A::checkpoint, A::segment, A::segment, A::segment});  // unchanged
  // Eval mode never checkpoints; a wrong-sized choice is an error.
  CHECK_THROWS_WITH(m.set_layer_activations({A::checkpoint}), ContainsSubstring("one entry per decoder layer (4), found 1"));
}

TEST_CASE("Llama: a checkpointed QLoRA layer's recompute leaves out what backward never reads and keeps the gradients",
          "[memory_plan][llama]") {
  // The down projection's output (its NF4 GEMM plus the LoRA GEMM adding to it) only carries the
  // gradient back: the recompute runs neither that GEMM nor its dequantisation, and the gradients are
  // those of the layers kept whole. Offloaded layers also take attention from the first forward, and
  // offload_qkv ones q, k, v and the residual stream after attention, so the q, k, v and o projections
  // are left out too.
  auto m = qlora(test::tiny_llama_config(2), kCPU, DType::f32);
  Generator gen(14);
  const Tensor ids = randint(0, 41, {2, 20}, DType::i64, kCPU, &gen);      // (2, 20)
  const Tensor targets = randint(0, 41, {2, 20}, DType::i64, kCPU, &gen);  // (2, 20)
  using A = nn::LayerActivations;
  auto backward_kernels = [&](A a, Step& step) {
    m->set_layer_activations({a, a});
    for (auto& [name, p] : m->named_parameters()) p.zero_grad();
    Tensor loss = m->chunked_loss((*m)(ids), targets);
    test::KernelCounter c;
    {
      HandlerScope scope(&c);
      loss.backward();
    }
    step.loss = loss.item<double>();
    for (auto& [name, p] : m->named_trainable_parameters()) step.grads.push_back(p.grad());
    return c.by_name;
  };
  Step kept, checkpointed, plain_offloaded, offloaded;
  auto k = backward_kernels(A::keep, kept);
  auto c = backward_kernels(A::checkpoint, checkpointed);
  auto po = backward_kernels(A::offload, plain_offloaded);
  auto o = backward_kernels(A::offload_qkv, offloaded);
  // 7 linears a layer: the backward dequantises each once for its input gradient (not q, k and v in
  // layer 0, whose input, the frozen embedding's output, needs none); the recompute 6 a layer, and
  // an offloaded layer's, which keeps q, k, v and the residual stream after attention, 2 (gate, up).
  CHECK(k["nf4_dequantize"] == 2 * 7 - 3);
  CHECK(c["nf4_dequantize"] == 2 * 7 - 3 + 2 * 6);
  CHECK(po["nf4_dequantize"] == 2 * 7 - 3 + 2 * 6);  // plain offload: attention only
  CHECK(po["scaled_dot_product_attention"] == 0);
  CHECK(o["nf4_dequantize"] == 2 * 7 - 3 + 2 * 2);
  CHECK(o["rotary_embedding"] == k["rotary_embedding"]);  // only rope's backward: q and k are kept
  CHECK(o["scaled_dot_product_attention"] == 0);
  CHECK(c["scaled_dot_product_attention"] == 2);
  // With the MLP in pieces of 8 tokens (checkpoint_chunks runs each piece again in its backward), the
  // layer's recompute leaves the whole MLP out: 4 dequantisations a layer (q, k, v, o) over the kept
  // layer's.
  m->set_mlp_chunk(8);
  Step kept_pieces, checkpointed_pieces;
  auto kp = backward_kernels(A::keep, kept_pieces);
  auto cp = backward_kernels(A::checkpoint, checkpointed_pieces);
  CHECK(cp["nf4_dequantize"] - kp["nf4_dequantize"] == 2 * 4);
  // Each piece's backward runs it again without down_proj, the shorter last one too (4 tokens: recorded
  // as the first piece of its size): 2 + 2 + 2, then 3 input gradients a piece, and 4 for attention's linears.
  CHECK(kp["nf4_dequantize"] == 2 * (2 + 2 + 2 + 3 * 3 + 4) - 3);
  for (const Step* s : {&checkpointed, &plain_offloaded, &offloaded, &kept_pieces, &checkpointed_pieces}) {
    CHECK(std::abs(s->loss - kept.loss) <= 1e-6 * std::abs(kept.loss));
    REQUIRE(s->grads.size() == kept.grads.size());
    for (size_t i = 0; i < kept.grads.size(); ++i) test::require_close(s->grads[i], kept.grads[i], 1e-5, 1e-6);
  }
}

TEST_CASE("Llama: a sequence-chunked MLP gives the same loss and gradients and keeps less", "[memory_plan][llama]") {
  using A = nn::LayerActivations;
  nn::LlamaOptions lo;
  lo.seed = 15;
  nn::Llama m(test::tiny_llama_config(3), lo);
  m.train();
  Generator gen(16);
  const Tensor ids = randint(0, 41, {2, 29}, DType::i64, kCPU, &gen);      // (2, 29)
  const Tensor targets = randint(0, 41, {2, 29}, DType::i64, kCPU, &gen);  // (2, 29)
  CHECK(m.mlp_chunk() == 0);
  for (std::vector<A> layers : {std::vector<A>(3, A::keep), std::vector<A>{A::checkpoint, A::offload, A::keep}}) {
    m.set_layer_activations(layers);
    m.set_mlp_chunk(0);
    const Step whole = loss_and_grads(m, ids, targets);
    m.set_mlp_chunk(8);  // 29 tokens: chunks of 8, 8, 8 and 5
    CHECK(m.mlp_chunk() == 8);
    const Step chunked = loss_and_grads(m, ids, targets);
    CHECK(std::abs(chunked.loss - whole.loss) <= 1e-6 * std::abs(whole.loss));
    for (size_t i = 0; i < whole.grads.size(); ++i) test::require_close(chunked.grads[i], whole.grads[i], 1e-6, 1e-7);
  }
  // Kept layers hold no (tokens, intermediate) tensors for backward once the MLP is chunked.
  auto kept_after_forward = [&](int64_t chunk) {
    m.set_layer_activations(std::vector<A>(3, A::keep));
    m.set_mlp_chunk(chunk);
    const size_t before = memory_usage(kCPU).allocated;
    Tensor h = m(ids);
    return memory_usage(kCPU).allocated - before;
  };
  const size_t whole = kept_after_forward(0), chunked = kept_after_forward(8);
  const size_t intermediates = 3 * 2 * 29 * static_cast<size_t>(m.config().intermediate_size) * 4;  // g, u, swiglu: f32
  INFO("kept after forward: whole " << whole << ", chunked " << chunked);
  CHECK(whole - chunked >= 3 * intermediates * 9 / 10);
  // In eval mode the chunks run without checkpoints, and give the same hidden states.
  m.eval();
  m.set_mlp_chunk(0);
  const Tensor a = m(ids);
  m.set_mlp_chunk(5);
  test::require_close(m(ids), a, 1e-6, 1e-7);
  CHECK_THROWS_WITH(m.set_mlp_chunk(-1), ContainsSubstring("0 (off) or positive"));
}

TEST_CASE("Llama: the loss head's memory budget sets the chunk and not the loss", "[memory_plan][llama]") {
  nn::LlamaOptions lo;
  lo.seed = 13;
  nn::Llama m(test::tiny_llama_config(2), lo);
  Generator gen(14);
  const Tensor ids = randint(0, 41, {2, 40}, DType::i64, kCPU, &gen);      // (2, 40)
  const Tensor targets = randint(0, 41, {2, 40}, DType::i64, kCPU, &gen);  // (2, 40)
  const Step whole = loss_and_grads(m, ids, targets);
  CHECK(m.loss_memory_budget() == nn::ChunkedLossOptions{}.memory_budget_bytes);
  // 41 f32 logits per token: 7 tokens per chunk, 12 chunks; the head's transient shrinks with them.
  m.set_loss_memory_budget(7 * 41 * 4);
  REQUIRE(nn::chunked_loss_chunk_size(41, DType::f32, m.loss_memory_budget(), true) == 7);
  const Step chunked = loss_and_grads(m, ids, targets);
  CHECK(std::abs(chunked.loss - whole.loss) <= 1e-5 * std::abs(whole.loss));
  for (size_t i = 0; i < whole.grads.size(); ++i) test::require_close(chunked.grads[i], whole.grads[i], 1e-5, 1e-6);
  CHECK_THROWS_WITH(m.set_loss_memory_budget(0), ContainsSubstring("must be positive"));
}

TEST_CASE("memory plan: a tiny QLoRA Llama at several budgets on the CPU: the plan and the real peak fit", "[memory_plan]") {
  check_budgets([] { return tiny_qlora(kCPU, DType::f32); }, 2, 256);
  // With the MLP in pieces of 64 tokens the probe runs longer than a piece, and the plans still fit.
  check_budgets(
      [] {
        auto m = tiny_qlora(kCPU, DType::f32);
        m->set_mlp_chunk(64);
        return m;
      },
      2, 256);
  auto model = tiny_qlora(kCPU, DType::f32);
  nn::MemoryPlanOptions mo;
  mo.batch_size = 2;
  mo.seq_len = 256;
  mo.budget_bytes = size_t{1} << 40;
  const nn::MemoryPlan plan = nn::plan_memory(*model, mo);
  mo.budget_bytes = plan.minimum_budget_bytes;
  CHECK(nn::plan_memory(*model, mo).num_checkpointed() == 4);  // here the least memory has every layer in segments
}

TEST_CASE("memory plan: when nothing fits with whole MLPs the plan puts them in pieces", "[memory_plan]") {
  nn::MemoryPlanOptions mo;
  mo.batch_size = 2;
  mo.seq_len = 256;
  mo.budget_bytes = size_t{1} << 40;
  mo.mlp_chunk_when_needed = 64;
  auto model = tiny_qlora(kCPU, DType::f32);
  mo.optimizer_state_bytes = nn::AdamW(model->named_trainable_parameters()).pending_state_bytes();  // as the Trainer plans
  const size_t whole_minimum = nn::plan_memory(*model, mo).minimum_budget_bytes;
  model->set_mlp_chunk(64);
  const size_t pieces_minimum = nn::plan_memory(*model, mo).minimum_budget_bytes;
  model->set_mlp_chunk(0);
  REQUIRE(pieces_minimum < whole_minimum);
  // Between the two least budgets: only pieces fit; the plan says so and sets them.
  mo.budget_bytes = (pieces_minimum + whole_minimum) / 2;
  const nn::MemoryPlan plan = nn::plan_memory(*model, mo);
  CHECK(plan.mlp_chunk == 64);
  CHECK(model->mlp_chunk() == 0);  // planning leaves the model as it was
  CHECK_THAT(plan.describe(), ContainsSubstring("MLPs in pieces of 64 tokens"));
  plan.apply(*model);
  CHECK(model->mlp_chunk() == 64);
  // Never, or a sequence shorter than two pieces: the budget is refused.
  model->set_mlp_chunk(0);
  mo.mlp_chunk_when_needed = 0;
  CHECK_THROWS_WITH(nn::plan_memory(*model, mo), ContainsSubstring("needs at least"));
  mo.mlp_chunk_when_needed = 200;
  CHECK_THROWS_WITH(nn::plan_memory(*model, mo), ContainsSubstring("needs at least"));
  // Below both: the error names the least budget with pieces.
  mo.mlp_chunk_when_needed = 64;
  mo.budget_bytes = pieces_minimum - 1;
  CHECK_THROWS_WITH(nn::plan_memory(*model, mo), ContainsSubstring("also tried: the MLPs in pieces of 64 tokens"));
  // The Trainer trains within it: the plan's pieces are the model's. (On the CPU every allocation
  // counts: the first model goes before the second is made.)
  const size_t budget = (pieces_minimum + whole_minimum) / 2;
  model.reset();
  auto fresh = tiny_qlora(kCPU, DType::f32);
  nn::AdamW opt(fresh->named_trainable_parameters());
  data::PackOptions po;
  po.batch_size = 2;
  po.seq_len = 256;
  data::PackedDataset stream(test::random_documents(400, 5, fresh->config().vocab_size), po);
  train::TrainerOptions o;
  o.memory_budget = budget;
  o.memory_plan_options.mlp_chunk_when_needed = 64;
  train::Trainer trainer(*fresh, opt, stream, o);
  REQUIRE(trainer.memory_plan().has_value());
  CHECK(fresh->mlp_chunk() == 64);
  reset_peak_memory(kCPU);
  REQUIRE(trainer.train_step().has_value());
  REQUIRE(trainer.train_step().has_value());
  CHECK(memory_usage(kCPU).peak <= budget);
}

TEST_CASE("memory plan: the parts of a plan and its description; the error below the minimum", "[memory_plan]") {
  auto model = tiny_qlora(kCPU, DType::f32);
  nn::MemoryPlanOptions mo;
  mo.batch_size = 2;
  mo.seq_len = 64;
  mo.budget_bytes = size_t{1} << 30;
  mo.optimizer_state_bytes = 12345;
  const auto grads_before = model->named_trainable_parameters();
  const GeneratorState rng = default_generator().state();
  const nn::MemoryPlan plan = nn::plan_memory(*model, mo);
  // The model and the default generator are as they were.
  for (const auto& [name, p] : grads_before) CHECK_FALSE(p.grad().defined());
  CHECK(default_generator().state().offset == rng.offset);
  CHECK(plan.optimizer_bytes == 12345);
  CHECK(plan.batch_bytes == 2 * 64 * 2 * 8);
  CHECK(plan.layer_input_bytes == 2 * 64 * 256 * 4);
  CHECK(plan.loss_chunk == 128);
  CHECK(plan.predicted_peak_bytes == plan.static_bytes + plan.dequantized_bytes + plan.gradient_bytes + plan.optimizer_bytes +
                                         plan.batch_bytes + plan.activation_bytes + plan.peak_extra_bytes);
  CHECK(plan.layer.kept.saved.at(128) > 4 * plan.layer_input_bytes);  // a kept layer holds far more than its output
  CHECK(plan.layer.checkpointed.saved.at(128) >= plan.layer_input_bytes);   // a checkpointed one: its output
  CHECK(plan.layer.checkpointed.saved.at(128) <= plan.layer_input_bytes + 4096);
  const std::string text = plan.describe();
  CHECK_THAT(text, ContainsSubstring("batches of 2 x 64 tokens on cpu, budget 1.00 GiB"));
  CHECK_THAT(text, ContainsSubstring("4 of 4 kept whole (0-3), 0 checkpointed (none)"));
  CHECK_THAT(text, ContainsSubstring("chunks of 128 tokens"));
  CHECK_THAT(text, ContainsSubstring("predicted peak"));
  plan.apply(*model);
  CHECK(model->layer_activations() == plan.layer_activations);
  CHECK(model->loss_memory_budget() == plan.loss_memory_budget);

  mo.budget_bytes = plan.minimum_budget_bytes - 1;
  CHECK_THROWS_WITH(nn::plan_memory(*model, mo),
                    ContainsSubstring("[memory plan] a training step on batches of 2 x 64 tokens needs at least") &&
                        ContainsSubstring("Lower the sequence length or the batch size"));

  // Eight layers: the least memory puts them in segments (four have too few layer inputs to save).
  nn::LlamaConfig deep_config = nn::LlamaConfig::named("tiny");
  deep_config.num_hidden_layers = 8;
  auto deep = qlora(deep_config, kCPU, DType::f32);
  mo.budget_bytes = size_t{1} << 30;
  const size_t least = nn::plan_memory(*deep, mo).minimum_budget_bytes;
  mo.budget_bytes = least;
  const nn::MemoryPlan tight = nn::plan_memory(*deep, mo);
  CHECK(tight.num_checkpointed() == 8);
  REQUIRE(tight.segment_layers >= 2);
  const std::vector<nn::LayerActivations> seg = tight.layer_activations;
  for (size_t i = 0; i < seg.size(); ++i)
    CHECK(seg[i] == (i % static_cast<size_t>(tight.segment_layers) == 0 ? nn::LayerActivations::checkpoint
                                                                          : nn::LayerActivations::segment));
  CHECK_THAT(tight.describe(), ContainsSubstring(fmt::format("decoder layers: all 8 in {} segment",
                                                             (8 + tight.segment_layers - 1) / tight.segment_layers)));
  // Without segments the least plan checkpoints every layer, and needs more.
  mo.segments_when_needed = false;
  mo.budget_bytes = size_t{1} << 30;
  const size_t without = nn::plan_memory(*deep, mo).minimum_budget_bytes;
  CHECK(without > least);
  mo.budget_bytes = least;
  CHECK_THROWS_WITH(nn::plan_memory(*deep, mo), ContainsSubstring("needs at least"));
  mo.budget_bytes = without;
  const nn::MemoryPlan checkpointed = nn::plan_memory(*deep, mo);
  CHECK(checkpointed.segment_layers == 0);
  CHECK_THAT(checkpointed.describe(), ContainsSubstring("0 of 8 kept whole (none), 8 checkpointed (0-7)"));
}

TEST_CASE("trainer: memory_budget needs a Llama trained with the default loss", "[memory_plan][trainer]") {
  auto model = tiny_qlora(kCPU, DType::f32);
  nn::AdamW opt(model->named_trainable_parameters());
  data::PackOptions po;
  po.batch_size = 1;
  po.seq_len = 16;
  data::PackedDataset stream(test::random_documents(8, 1, 4096), po);
  train::TrainerOptions o;
  o.memory_budget = size_t{1} << 30;
  o.loss = train::llama_loss(false);
  CHECK_THROWS_WITH(train::Trainer(*model, opt, stream, o), ContainsSubstring("plans for the default loss"));
  o.loss = {};
  o.memory_budget.reset();
  train::Trainer unplanned(*model, opt, stream, o);
  CHECK_FALSE(unplanned.memory_plan().has_value());
  // 0: the default budget (this machine's free memory less a margin) keeps every layer whole.
  o.memory_budget = 0;
  train::Trainer planned(*model, opt, stream, o);
  REQUIRE(planned.memory_plan().has_value());
  CHECK(planned.memory_plan()->budget_bytes > planned.memory_plan()->predicted_peak_bytes);
  CHECK(planned.memory_plan()->num_checkpointed() == 0);
  CHECK(planned.memory_plan()->optimizer_bytes == opt.pending_state_bytes());
  CHECK(opt.pending_state_bytes() == 2 * 4 * static_cast<size_t>(numel_of(model->named_trainable_parameters())));
  CHECK(model->layer_activations() == planned.memory_plan()->layer_activations);
  CHECK(model->loss_memory_budget() == planned.memory_plan()->loss_memory_budget);
  REQUIRE(planned.train_step().has_value());
  CHECK(opt.pending_state_bytes() == 0);  // the first step allocated it
  CHECK(nn::SGD(model->named_trainable_parameters()).pending_state_bytes() == 0);  // no momentum, no state
}

TEST_CASE("memory plan: QLoRA Llamas at several budgets on the GPU: the plan and the real peak fit", "[memory_plan][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Device gpu("cuda:0");
  SECTION("the tiny Llama, bf16, 2 x 512 tokens") {
    check_budgets([&] { return tiny_qlora(gpu, DType::bf16); }, 2, 512);
  }
  SECTION("Llama 3.1 8B's shapes with 2 decoder layers, bf16, 1 x 2048 tokens") {
    nn::LlamaConfig c = nn::LlamaConfig::named("llama3.1-8b");
    c.num_hidden_layers = 2;
    check_budgets([&] { return qlora(c, gpu, DType::bf16); }, 1, 2048);
  }
}


TEST_CASE("Llama: offloaded layers on the GPU give the checkpointed loss and gradients and keep their inputs on the host",
          "[memory_plan][llama][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Device gpu("cuda:0");
  using A = nn::LayerActivations;
  nn::LlamaOptions lo;
  lo.seed = 21;
  lo.device = gpu;
  nn::LlamaConfig c = test::tiny_llama_config(6);
  c.hidden_size = 256;  // activations of 512 KiB: what offloading saves is plain to see
  c.intermediate_size = 512;
  c.head_dim = 64;
  nn::Llama m(c, lo);
  m.train();
  Generator gen(22);
  const Tensor ids = randint(0, 41, {2, 256}, DType::i64, kCPU, &gen).to(gpu);      // (2, 256)
  const Tensor targets = randint(0, 41, {2, 256}, DType::i64, kCPU, &gen).to(gpu);  // (2, 256)
  const std::vector<A> mixed = {A::offload, A::offload, A::offload, A::checkpoint, A::offload, A::keep};
  const std::vector<A> plain = {A::checkpoint, A::checkpoint, A::checkpoint, A::checkpoint, A::checkpoint, A::keep};
  m.set_layer_activations(plain);
  const Step checkpointed = loss_and_grads(m, ids, targets);
  m.set_layer_activations(mixed);
  for (int round = 0; round < 2; ++round) {  // the second reuses the cached pinned blocks
    const Step offloaded = loss_and_grads(m, ids, targets);
    CHECK(std::abs(offloaded.loss - checkpointed.loss) <= 1e-6 * std::abs(checkpointed.loss));
    for (size_t i = 0; i < checkpointed.grads.size(); ++i)
      test::require_close(offloaded.grads[i], checkpointed.grads[i], 1e-5, 1e-6);  // atomics in the embedding's backward
  }
  CHECK(cuda::pinned_host_bytes() > 0);
  const size_t pinned = cuda::pinned_host_bytes();
  // After forward the device holds four layer inputs less (each a (2, 256, 256) f32 activation); the
  // offloaded attention outputs are not on the device either.
  auto kept_after_forward = [&](std::vector<A> activations) {
    m.set_layer_activations(std::move(activations));
    cuda::synchronize();
    const size_t before = memory_usage(gpu).allocated;
    Tensor h = m(ids);
    cuda::synchronize();
    return memory_usage(gpu).allocated - before;
  };
  const size_t act = 2 * 256 * 256 * 4;
  const size_t on_device = kept_after_forward(plain), with_offload = kept_after_forward(mixed);
  INFO("kept after forward: checkpointed " << on_device << ", offloaded " << with_offload);
  REQUIRE(on_device > with_offload);
  CHECK(on_device - with_offload == 4 * act);
  CHECK(cuda::pinned_host_bytes() == pinned);  // no new pinned memory: the cache served it
  // Segments 0-2 and 3-4, their inputs offloaded: the same loss and gradients, and after forward no
  // layer input of theirs on the device (five fewer than checkpointed).
  const std::vector<A> segments = {A::offload, A::segment, A::segment, A::offload, A::segment, A::keep};
  m.set_layer_activations(segments);
  const Step segmented = loss_and_grads(m, ids, targets);
  CHECK(std::abs(segmented.loss - checkpointed.loss) <= 1e-6 * std::abs(checkpointed.loss));
  for (size_t i = 0; i < checkpointed.grads.size(); ++i) test::require_close(segmented.grads[i], checkpointed.grads[i], 1e-5, 1e-6);
  CHECK(on_device - kept_after_forward(segments) == 5 * act);
  // A second backward through an offloaded layer is refused: its inputs went back to the device. (Not
  // through the chunked head, which refuses a second backward itself.)
  m.set_layer_activations(mixed);
  Tensor loss = sum(cast(m(ids), DType::f32));
  loss.backward({}, /*retain_graph=*/true);
  CHECK_THROWS_WITH(loss.backward(), ContainsSubstring("backward ran twice"));
}

TEST_CASE("memory plan: on a GPU the least plan offloads what the host budget holds, checkpoints the rest there, and fits",
          "[memory_plan][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const Device gpu("cuda:0");
  nn::LlamaConfig c = nn::LlamaConfig::named("tiny");
  c.num_hidden_layers = 8;
  auto make = [&] { return qlora(c, gpu, DType::bf16); };
  const int64_t batch = 2, seq = 1024;
  auto count = [](const nn::MemoryPlan& p, nn::LayerActivations a) {
    return std::count(p.layer_activations.begin(), p.layer_activations.end(), a);
  };
  auto count_offloaded = [](const nn::MemoryPlan& p) {
    return static_cast<int64_t>(std::count_if(p.layer_activations.begin(), p.layer_activations.end(), nn::is_offloaded));
  };
  // (The model planned here goes before train_within makes its own: the plan counts what the device holds.)
  size_t least_free = 0, least_plain = 0, least_mixed = 0, host_budget = 0;
  {
    auto model = make();
    nn::AdamW opt(model->named_trainable_parameters());
    nn::MemoryPlanOptions mo;
    mo.batch_size = batch;
    mo.seq_len = seq;
    mo.optimizer_state_bytes = opt.pending_state_bytes();  // the Trainer's plan counts it too
    mo.segments_when_needed = false;  // the least plans of layers kept, checkpointed and offloaded
    auto least = [&](size_t host) {  // the plan at the least budget with `host` bytes of host memory
      mo.host_budget_bytes = host;
      mo.budget_bytes = size_t{1} << 50;
      mo.budget_bytes = nn::plan_memory(*model, mo).minimum_budget_bytes;
      return nn::plan_memory(*model, mo);
    };
    const nn::MemoryPlan free_host = least(0);  // half of the host's free memory: room for every layer
    INFO(free_host.describe());
    const auto offloaded = count_offloaded(free_host);
    REQUIRE(offloaded > 0);
    CHECK(free_host.host_bytes > static_cast<size_t>(offloaded) * free_host.layer_input_bytes);  // inputs and attention
    CHECK(free_host.predicted_peak_bytes <= free_host.minimum_budget_bytes);
    least_free = free_host.minimum_budget_bytes;
    least_plain = least(1).minimum_budget_bytes;  // no room for one layer: nothing offloads
    host_budget = 3 * (free_host.host_bytes / static_cast<size_t>(offloaded));
    const nn::MemoryPlan mixed = least(host_budget);
    INFO(mixed.describe());
    least_mixed = mixed.minimum_budget_bytes;
    // Room for 3 layers as the free plan offloads them: at least 3 offload (some without q, k, v, which
    // take less room), the lowest ones.
    const auto mixed_offloaded = count_offloaded(mixed);
    CHECK(mixed_offloaded >= 3);
    CHECK(count(mixed, nn::LayerActivations::checkpoint) > 0);
    CHECK(mixed.host_bytes <= host_budget);
    for (int64_t i = 0; i < mixed_offloaded; ++i) CHECK(nn::is_offloaded(mixed.layer_activations[static_cast<size_t>(i)]));
    CHECK(least_free <= least_mixed);
    CHECK(least_mixed < least_plain);  // offloading lowers the least budget
  }
  // Two real training steps at each least budget: the peak within it and near the prediction.
  for (const auto& [budget, host] : {std::pair{least_free, size_t{0}}, std::pair{least_mixed, host_budget}}) {
    const BudgetRun r = train_within(make, budget, batch, seq, host);
    INFO(r.plan.describe());
    std::printf("%s\nactual peak %.2f MiB\n", r.plan.describe().c_str(), static_cast<double>(r.actual_peak) / kMiB);
    CHECK(count_offloaded(r.plan) > 0);
    if (host > 0) CHECK(r.plan.host_bytes <= host);
    CHECK(r.actual_peak <= budget);
    const double predicted = static_cast<double>(r.plan.predicted_peak_bytes), actual = static_cast<double>(r.actual_peak);
    CHECK(std::abs(actual - predicted) <= 0.15 * predicted);
  }
}


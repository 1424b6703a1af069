// The memory-budget planner on Llama 3.1 8B (random weights, the real config) as QLoRA trains it:
// NF4 base, LoRA r=16 on every linear layer, AdamW, batch 1 x 4096 tokens. Per budget: the plan
// (layers checkpointed, loss chunk), its predicted peak, the real peak of AdamW steps and the step
// time. Optional: --layers N, --seq T, --batch B, --iters N, --warmup N (untimed steps first, default 1; 0 for a
// sequence so long that one step is all a run can afford: its first step, set-up included, is the one timed), --budgets "10,14,20" (GiB; 0: the default; least: the least budget a plan fits),
// --mlp-chunk N (the MLP in checkpointed pieces of N tokens: long sequences), --ops (each plan's step
// by category — GEMMs, attention, dequantisation, loss, optimizer, the rest, the time between ops — with
// GEMM and attention TFLOP/s against the 790 cuBLASLt reaches on an 8192³ bf16 product), --trace-memory
// FILE (one step's per-op memory timeline, bench/memory_trace.h, of each plan in turn), --longest (no
// step: the planner's memory model at T = --seq, 2T, 4T, ... until the least plan no longer fits the
// default budget or the host budget, then halving the step between the last length that fits and the first
// that does not, down to 16384 tokens (--longest-step N: N): the longest sequence that trains on this GPU;
// --longest-max T: no length above T is tried, each plan running one decoder layer forward at T), --host-budget GiB (the
// pinned host memory offloaded layers may take; default: half the host's free memory). Each plan's
// description goes to stderr.
#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "bench/cuda_timing.h"
#include "bench/memory_trace.h"
#include "bench/op_timer.h"
#include "bench/qlora_model.h"
#include "core/cuda/runtime.h"
#include "core/memory.h"
#include "core/ops.h"
#include "nn/llama.h"
#include "nn/memory_plan.h"
#include "nn/optim.h"

using namespace kiln;

namespace {

struct Args {
  int64_t layers = 32;
  int64_t seq = 4096;
  int64_t batch = 1;
  int iters = 3;
  int warmup = 1;  // untimed steps first (plans, workspaces, the optimizer state); 0: the first step is timed too
  std::string budgets = "8,10,14,20,28,0";
  int64_t mlp_chunk = 0;
  double host_budget_gib = 0;  // 0: the planner's default
  bool ops = false;
  bool longest = false;
  int64_t longest_max = int64_t{1} << 24;  // --longest tries no length above this
  int64_t longest_step = 16384;            // and bisects down to this many tokens
  std::string trace_memory;  // file for the per-op memory timeline, or empty
};

constexpr double kCublasLtTflops = 790;  // bf16 8192³ through cuBLASLt on the H200 (and about so on an H100)

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// The planner's options for batches of a.batch x t tokens (budget unset).
nn::MemoryPlanOptions plan_options(const nn::AdamW& opt, const Args& a, int64_t t) {
  nn::MemoryPlanOptions mo;
  mo.batch_size = a.batch;
  mo.seq_len = t;
  mo.optimizer_state_bytes = opt.pending_state_bytes();
  mo.host_budget_bytes = static_cast<size_t>(a.host_budget_gib * kGiB);
  return mo;
}

// The least plan of `model` for batches of a.batch x t tokens (the planner's probe and memory model; no step).
nn::MemoryPlan least_plan(nn::Llama& model, const nn::AdamW& opt, const Args& a, int64_t t) {
  nn::MemoryPlanOptions mo = plan_options(opt, a, t);
  mo.budget_bytes = size_t{1} << 50;
  mo.budget_bytes = nn::plan_memory(model, mo).minimum_budget_bytes;
  return nn::plan_memory(model, mo);
}

// The least plan at T = a.seq, 2T, 4T, ... until it needs more than the default budget (the GPU's free
// memory less a margin), then bisected down to 16384 tokens: one row per length tried.
int longest_sequence(nn::Llama& model, const nn::AdamW& opt, const Args& a) {
  const Device gpu(DeviceType::cuda, 0);
  const size_t budget = nn::default_memory_budget(gpu);
  std::printf("default budget %.2f GiB (free device memory less the margin)\n"
              "| T | least GiB | checkpointed (offloaded, with q k v) | segments of | host GiB | MLP pieces | loss chunk | fits |\n"
              "|---|---|---|---|---|---|---|---|\n",
              static_cast<double>(budget) / kGiB);
  const auto fits = [&](int64_t t) {
    nn::MemoryPlan plan;
    try {
      plan = least_plan(model, opt, a, t);
    } catch (const Error& e) {
      std::printf("| %lld | %s |\n", static_cast<long long>(t), e.what());
      return false;
    }
    const auto count = [&](bool (*pick)(nn::LayerActivations)) {
      return static_cast<long long>(std::count_if(plan.layer_activations.begin(), plan.layer_activations.end(), pick));
    };
    const bool ok = plan.predicted_peak_bytes <= budget;
    std::printf("| %lld | %.2f | %lld (%lld, %lld) | %s | %.2f | %lld | %lld | %s |\n", static_cast<long long>(t),
                static_cast<double>(plan.predicted_peak_bytes) / kGiB, static_cast<long long>(plan.num_checkpointed()),
                count(nn::is_offloaded), count([](nn::LayerActivations x) { return x == nn::LayerActivations::offload_qkv; }),
                plan.segment_layers > 0 ? std::to_string(plan.segment_layers).c_str() : "-",
                static_cast<double>(plan.host_bytes) / kGiB, static_cast<long long>(plan.mlp_chunk),
                static_cast<long long>(plan.loss_chunk), ok ? "yes" : "no");
    std::fflush(stdout);
    return ok;
  };
  int64_t good = 0, bad = a.seq;
  while (bad <= a.longest_max && fits(bad)) good = bad, bad *= 2;
  if (bad > a.longest_max) {  // everything tried fits
    std::printf("longest: at least %lld tokens (none longer tried: --longest-max)\n", static_cast<long long>(good));
    return 0;
  }
  while (good > 0 && bad - good > a.longest_step) {
    const int64_t mid = good + (bad - good) / 2 / a.longest_step * a.longest_step;
    (fits(mid) ? good : bad) = mid;
  }
  std::printf("longest: %lld tokens\n", static_cast<long long>(good));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  const auto usage = [&] {
    std::fprintf(stderr, "usage: %s [--layers N] [--seq T] [--batch B] [--iters N] [--warmup N] [--budgets GiB,GiB,...] [--mlp-chunk N] [--ops] [--trace-memory FILE] [--longest] [--longest-max T] [--longest-step T] [--host-budget GiB]\n",
                 argv[0]);
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--ops" || k == "--longest") {
      (k == "--ops" ? a.ops : a.longest) = true;
      continue;
    }
    if (i + 1 >= argc) return usage();
    const std::string v = argv[++i];
    if (k == "--layers") a.layers = std::stoll(v);
    else if (k == "--seq") a.seq = std::stoll(v);
    else if (k == "--batch") a.batch = std::stoll(v);
    else if (k == "--iters") a.iters = std::stoi(v);
    else if (k == "--warmup") a.warmup = std::max(0, std::stoi(v));
    else if (k == "--budgets") a.budgets = v;
    else if (k == "--mlp-chunk") a.mlp_chunk = std::stoll(v);
    else if (k == "--trace-memory") a.trace_memory = v;
    else if (k == "--host-budget") a.host_budget_gib = std::stod(v);
    else if (k == "--longest-max") a.longest_max = std::stoll(v);
    else if (k == "--longest-step") a.longest_step = std::max<int64_t>(1, std::stoll(v));
    else return usage();
  }
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  try {
    const Device gpu(DeviceType::cuda, 0);
    nn::LlamaConfig cfg = nn::LlamaConfig::named("llama3.1-8b");
    cfg.num_hidden_layers = a.layers;
    auto model = bench::qlora_llama(cfg, gpu);
    model->set_mlp_chunk(a.mlp_chunk);
    nn::AdamW opt(model->named_trainable_parameters());
    if (a.longest) return longest_sequence(*model, opt, a);
    Generator gen(7);
    const Tensor ids = randint(0, cfg.vocab_size, {a.batch, a.seq}, DType::i64, gpu, &gen);      // (B, T)
    const Tensor targets = randint(0, cfg.vocab_size, {a.batch, a.seq}, DType::i64, gpu, &gen);  // (B, T)
    std::printf("Llama 3.1 8B config, %lld layers, NF4 base, LoRA r=16, AdamW, batch %lld x %lld tokens, MLP chunk %lld; "
                "%.2f GiB allocated\n",
                static_cast<long long>(a.layers), static_cast<long long>(a.batch), static_cast<long long>(a.seq),
                static_cast<long long>(a.mlp_chunk), static_cast<double>(memory_usage(gpu).allocated) / kGiB);
    std::printf("| budget GiB | checkpointed (offloaded) | host GiB | dequantised layers | loss chunk | predicted GiB | peak GiB | "
                "peak/predicted | step ms | tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
    std::stringstream list(a.budgets);
    for (std::string item; std::getline(list, item, ',');) {
      nn::MemoryPlanOptions mo = plan_options(opt, a, a.seq);
      nn::MemoryPlan plan;
      try {
        if (item == "least") {  // the least budget any plan fits
          mo.budget_bytes = size_t{1} << 50;
          mo.budget_bytes = nn::plan_memory(*model, mo).minimum_budget_bytes;
        } else {
          mo.budget_bytes = static_cast<size_t>(std::stod(item) * kGiB);
        }
        plan = nn::plan_memory(*model, mo);
      } catch (const Error& e) {
        std::printf("| %s | %s |\n", item.c_str(), e.what());
        continue;
      }
      plan.apply(*model);
      std::fprintf(stderr, "%s\n", plan.describe().c_str());
      auto step = [&] { bench::training_step(*model, opt, ids, targets); };
      for (int i = 0; i < a.warmup; ++i) step();  // plans, workspaces, the optimizer state
      cuda::synchronize();
      reset_peak_memory(gpu);
      const double ms = bench::time_ms(step, a.iters, 0);
      const double peak = static_cast<double>(memory_usage(gpu).peak);
      const double predicted = static_cast<double>(plan.predicted_peak_bytes);
      const auto offloaded = std::count_if(plan.layer_activations.begin(), plan.layer_activations.end(), nn::is_offloaded);
      std::printf("| %.2f | %lld of %lld (%lld) | %.2f | %lld | %lld | %.2f | %.2f | %.3f | %.0f | %.0f |\n",
                  static_cast<double>(plan.budget_bytes) / kGiB, static_cast<long long>(plan.num_checkpointed()),
                  static_cast<long long>(a.layers), static_cast<long long>(offloaded), static_cast<double>(plan.host_bytes) / kGiB,
                  static_cast<long long>(plan.dequantized_layers), static_cast<long long>(plan.loss_chunk), predicted / kGiB, peak / kGiB, peak / predicted, ms,
                  static_cast<double>(a.batch * a.seq) / (ms / 1000.0));
      if (a.ops) bench::print_step_breakdown(step, ms, kCublasLtTflops);
      if (!a.trace_memory.empty()) {
        std::FILE* f = std::fopen(a.trace_memory.c_str(), "a");
        KILN_CHECK(f, "cuda_memory_plan", "cannot open '{}' for the memory trace", a.trace_memory);
        std::fprintf(f, "# budget %s: %s\n", item.c_str(), plan.describe().c_str());
        {
          bench::MemoryTrace trace(gpu, f);
          ObserverScope scope(&trace);
          step();
          cuda::synchronize();
        }
        std::fclose(f);
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 1;
  }
  return 0;
}

// QLoRA Llama 3.1 8B (random bf16 weights quantised to NF4 layer by layer, LoRA on every linear) under
// fully_shard, its ranks threads of the local backend sharing one GPU. Per world size: per-rank memory
// (NF4 base and everything sharded, from the layout; the allocator's total), one layer's all_gather,
// unshard (gather + copy-out) and gradient reduce_scatter, and the forward+backward step with overlap
// (prefetch 1, asynchronous reductions) and without (every collective waited where it is issued).
// --config llama3.1-70b: the 70B shapes, short sequences and activation checkpointing by default.
// --parity N: instead, N AdamW steps of one global batch of 2 rows (rank r of 2 its row r) at world 1 and 2:
// the losses of each step, which sharding must leave as one process has them.
// Usage: fsdp_llama [--config llama3.1-8b|llama3.1-70b] [--layers N] [--worlds 1,2,4] [--seq T]
//                   [--batch B] [--steps N] [--lora-r R] [--checkpointing 0|1] [--parity N]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "autograd/grad_mode.h"
#include "bench/cuda_timing.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "dist/fully_shard.h"
#include "dist/local.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "nn/optim.h"

using namespace kiln;

namespace {

const Device kGPU{DeviceType::cuda, 0};

struct Args {
  std::string config = "llama3.1-8b";
  int64_t layers = 0;  // 0: the config's (8B: 32, 70B: 80)
  std::vector<int> worlds;
  int64_t seq = 0;     // 0: 1024 for 8B, 256 for 70B
  int64_t batch = 1;
  int steps = 3;
  int64_t lora_r = 16;
  int checkpointing = -1;  // -1: on for 70B
  int parity = 0;          // > 0: the loss-parity run of that many steps instead
};

double gib(double b) { return b / (1024.0 * 1024.0 * 1024.0); }

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// What rank 0 measured in one world.
struct Row {
  int world = 0;
  double nf4_gib = 0, sharded_gib = 0, allocated_gib = 0;  // per rank, per rank, all ranks
  double layer_gather_ms = 0, layer_unshard_ms = 0, layer_reduce_ms = 0;
  double layer_gather_mib = 0, layer_reduce_mib = 0;
  double step_overlap_s = 0, step_serial_s = 0;
  int64_t units = 0;
};

// Every rank builds the model layer by layer: bf16 random init, NF4, LoRA, fully_shard, so the peak is
// one bf16 layer over the shards so far (the 70B fits two ranks on one GPU).
std::shared_ptr<dist::FsdpUnit> build(const nn::LlamaConfig& c, const Args& a, std::shared_ptr<dist::ProcessGroup> g,
                                      std::shared_ptr<nn::Llama>& model, const dist::FullyShardOptions& fo = {}) {
  nn::LlamaOptions lo;
  lo.dtype = DType::bf16;
  lo.device = kGPU;
  lo.seed = 1;
  nn::LoraConfig lc;
  lc.r = a.lora_r;
  lc.alpha = 2.0 * static_cast<double>(a.lora_r);
  lo.on_layer_built = [&](const std::string&, nn::LlamaDecoderLayer& layer) {
    nn::quantize_linears_nf4(layer);
    nn::apply_lora(layer, lc, 2);
    dist::fully_shard(layer, g, fo);
  };
  model = std::make_shared<nn::Llama>(c, lo);
  for (auto& [name, p] : model->named_parameters())
    if (name.find("lora_") == std::string::npos) p.set_requires_grad(false);  // the embeddings, norm, lm_head
  model->set_checkpoint_activations(a.checkpointing == 1);
  model->train();
  return dist::fully_shard(*model, g, fo);
}

// The same global batch (`world` rows of a fixed random batch, rank r its row r) trained `steps` AdamW
// steps: the mean loss over all ranks' tokens per step, as rank 0 sees it. Gradients are the sums over
// ranks divided by the world size (each rank's loss is its own mean), so every world size trains alike.
std::vector<double> parity_losses(const nn::LlamaConfig& c, const Args& a, int world, int rows, int steps) {
  std::vector<double> losses;
  dist::run_local(world, [&](dist::ProcessGroup& pg) {
    auto g = std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {});
    dist::FullyShardOptions fo;
    fo.gradient_divide_factor = world;
    std::shared_ptr<nn::Llama> model;
    auto root = build(c, a, g, model, fo);
    nn::AdamWOptions ao;
    ao.lr = 1e-3;
    nn::AdamW opt(model->named_trainable_parameters(), ao);
    Generator gen(7);
    const Tensor all = randint(0, c.vocab_size, {rows, a.seq + 1}, DType::i64, kCPU, &gen);  // (rows, T + 1)
    const int64_t per = rows / world;
    const Tensor mine = narrow(all, 0, pg.rank() * per, per);  // (per, T + 1)
    const Tensor ids = contiguous(narrow(mine, 1, 0, a.seq)).to(kGPU), targets = contiguous(narrow(mine, 1, 1, a.seq)).to(kGPU);
    std::vector<double> mine_losses;
    for (int s = 0; s < steps; ++s) {
      Tensor loss = model->chunked_loss((*model)(ids), targets, Reduction::mean);
      loss.backward();
      Tensor total = loss.detach().to(DType::f64);
      pg.all_reduce(total).wait();
      mine_losses.push_back(total.item<double>() / world);
      opt.step();
      model->zero_grad();
    }
    if (pg.rank() == 0) losses = mine_losses;
  });
  return losses;
}

Row run_world(const nn::LlamaConfig& c, const Args& a, int world) {
  Row row;
  row.world = world;
  std::mutex mutex;
  dist::run_local(world, [&](dist::ProcessGroup& pg) {
    auto g = std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {});
    std::shared_ptr<nn::Llama> model;
    auto root = build(c, a, g, model);
    const auto units = root->schedule_units();
    pg.barrier().wait();
    cuda::synchronize();
    Row r;
    r.world = world;
    r.units = static_cast<int64_t>(units.size());
    r.allocated_gib = gib(static_cast<double>(cuda::memory_stats().allocated));
    for (const auto& u : units) {
      r.sharded_gib += gib(static_cast<double>(u->local_bytes()));
      for (const dist::FsdpTensor& t : u->tensors())
        if (!t.parameter) r.nf4_gib += gib(static_cast<double>(t.replicated ? kiln::numel(t.shape) * itemsize(t.dtype) : t.shard_nbytes()));
    }

    // One decoder layer's collectives (units[1]: layer 0), each followed by Work::wait, timed on this stream.
    dist::FsdpUnit& layer = *units.at(1);
    const auto shard_bytes = static_cast<int64_t>(layer.sizes().shard_bytes);
    Tensor in = zeros({shard_bytes}, DType::u8, kGPU), out = empty({shard_bytes * world}, DType::u8, kGPU);
    r.layer_gather_mib = static_cast<double>(shard_bytes * world) / (1 << 20);
    r.layer_gather_ms = bench::time_ms([&] { pg.all_gather(out, in).wait(); }, 10, 2);
    r.layer_unshard_ms = bench::time_ms([&] {
      layer.unshard();
      layer.reshard();
    }, 10, 2);
    const int64_t grads = std::max<int64_t>(layer.sizes().grad_numel, 1);
    Tensor rs_in = zeros({grads * world}, DType::f32, kGPU), rs_out = empty({grads}, DType::f32, kGPU);
    r.layer_reduce_mib = static_cast<double>(grads * world * 4) / (1 << 20);
    r.layer_reduce_ms = bench::time_ms([&] { pg.reduce_scatter(rs_out, rs_in).wait(); }, 10, 2);

    // Steps: random ids, the chunked head, forward + backward (no optimizer).
    Tensor ids = randint(0, c.vocab_size, {a.batch, a.seq}, DType::i64, kGPU);
    Tensor targets = randint(0, c.vocab_size, {a.batch, a.seq}, DType::i64, kGPU);
    auto steps = [&](int n) {
      for (int i = 0; i < n; ++i) {
        Tensor h = (*model)(ids);
        model->chunked_loss(h, targets, Reduction::mean).backward();
        model->zero_grad();
      }
      cuda::synchronize();
    };
    for (bool overlap : {true, false}) {
      root->set_overlap(overlap ? 1 : 0, overlap);
      steps(1);  // warm-up (plans, allocator)
      pg.barrier().wait();
      const auto t0 = std::chrono::steady_clock::now();
      steps(a.steps);
      pg.barrier().wait();
      (overlap ? r.step_overlap_s : r.step_serial_s) = seconds_since(t0) / a.steps;
    }
    if (pg.rank() == 0) {
      std::lock_guard<std::mutex> lock(mutex);
      row = r;
    }
  });
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--config") a.config = v;
    else if (k == "--layers") a.layers = std::stoll(v);
    else if (k == "--seq") a.seq = std::stoll(v);
    else if (k == "--batch") a.batch = std::stoll(v);
    else if (k == "--steps") a.steps = std::stoi(v);
    else if (k == "--lora-r") a.lora_r = std::stoll(v);
    else if (k == "--checkpointing") a.checkpointing = std::stoi(v);
    else if (k == "--parity") a.parity = std::stoi(v);
    else if (k == "--worlds") {
      std::stringstream ss(v);
      std::string w;
      while (std::getline(ss, w, ',')) a.worlds.push_back(std::stoi(w));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--config llama3.1-8b|llama3.1-70b] [--layers N] [--worlds 1,2,4] [--seq T] [--batch B] "
                   "[--steps N] [--lora-r R] [--checkpointing 0|1] [--parity N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!cuda::is_available()) {
    std::printf("no CUDA device\n");
    return 0;
  }
  const bool big = a.config == "llama3.1-70b";
  nn::LlamaConfig c = nn::LlamaConfig::named(a.config);
  if (a.layers > 0) c.num_hidden_layers = a.layers;
  if (a.seq == 0) a.seq = big ? 256 : 1024;
  if (a.checkpointing < 0) a.checkpointing = big ? 1 : 0;
  if (a.worlds.empty()) a.worlds = big ? std::vector<int>{2} : std::vector<int>{1, 2, 4};
  std::printf("fsdp_llama: %s, %lld layers, NF4 base + LoRA r=%lld (bf16), batch %lld x %lld tokens, checkpointing %s, "
              "ranks as threads sharing cuda:0\n",
              a.config.c_str(), static_cast<long long>(c.num_hidden_layers), static_cast<long long>(a.lora_r),
              static_cast<long long>(a.batch), static_cast<long long>(a.seq), a.checkpointing ? "on" : "off");
  if (a.parity > 0) {
    std::printf("loss parity: one global batch of 2 x %lld tokens, AdamW lr 1e-3\n", static_cast<long long>(a.seq));
    std::vector<std::vector<double>> runs;
    for (int world : {1, 2}) {
      cuda::empty_cache();
      runs.push_back(parity_losses(c, a, world, 2, a.parity));
    }
    for (int s = 0; s < a.parity; ++s)
      std::printf("step %d: 1 rank %.6f, 2 ranks %.6f (relative difference %.2e)\n", s, runs[0][static_cast<size_t>(s)],
                  runs[1][static_cast<size_t>(s)], std::abs(runs[1][static_cast<size_t>(s)] / runs[0][static_cast<size_t>(s)] - 1));
    return 0;
  }
  std::printf("%5s %9s %11s %11s | %-28s %-28s %10s | %11s %11s %8s\n", "ranks", "NF4 GiB", "shards GiB", "alloc GiB",
              "layer all_gather (MiB, ms)", "layer reduce_scatter (MiB,ms)", "unshard ms", "overlap s", "serial s",
              "hidden");
  for (int world : a.worlds) {
    cuda::empty_cache();
    const Row r = run_world(c, a, world);
    // Collectives per step: each layer gathered in forward and again in backward, its gradients reduced.
    const double layers = static_cast<double>(r.units - 1);
    const double comm_s = layers * (2 * r.layer_unshard_ms + r.layer_reduce_ms) / 1e3;
    const double hidden = comm_s > 0 && world > 1 ? (r.step_serial_s - r.step_overlap_s) / comm_s : 0.0;
    std::printf("%5d %9.3f %11.3f %11.3f | %12.1f %14.3f  %12.2f %14.3f  %10.3f | %11.3f %11.3f %7.0f%%\n", world,
                r.nf4_gib, r.sharded_gib, r.allocated_gib, r.layer_gather_mib, r.layer_gather_ms, r.layer_reduce_mib,
                r.layer_reduce_ms, r.layer_unshard_ms, r.step_overlap_s, r.step_serial_s, 100.0 * hidden);
  }
  std::printf("NF4 GiB / shards GiB: one rank's NF4 base / everything sharded or replicated it holds (from the layout); "
              "alloc GiB: the allocator's total for all ranks after sharding. hidden: (serial - overlap) step time over "
              "the collectives' time per step (2 gathers + 1 reduction per layer, timed alone).\n");
  return 0;
}

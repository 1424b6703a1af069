// Shared by the fully_shard tests (CPU threads and one GPU): a small QLoRA Llama whose sizes shard
// unevenly over 2, 3 and 4 ranks, random documents, and one training run as world W ranks of the local
// backend (or one plain process), returning rank 0's losses and the gathered adapter.
#pragma once
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "dist/fsdp_parallel.h"
#include "dist/fully_shard.h"
#include "dist/local.h"
#include "dist/sharded_checkpoint.h"
#include "nn/lora.h"
#include "nn/nf4_linear.h"
#include "train/trainer.h"

namespace kiln::test {

// 2 layers; hidden 48, intermediate 90, vocab 200, 12-dim heads: NF4 blocks, LoRA ranks and embedding rows
// that divide by no world size above 2.
// Adapters trained with the same global batch summed in another order (another world size, or one
// process with the batch of 12): Adam turns f32 rounding of near-cancelling gradients into visible
// steps, up to ~4.7e-4 of a tensor's norm over 20 steps with random seeds (CPU and GPU); 1e-3 leaves room.
constexpr double kAcrossSplits = 1e-3;

inline nn::LlamaConfig fsdp_config() {
  return nn::LlamaConfig::from_json(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 48, "intermediate_size": 90,
    "max_position_embeddings": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "head_dim": 12, "rms_norm_eps": 1e-05, "initializer_range": 0.05, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "float32", "vocab_size": 200})",
                                    "fsdp test");
}

inline nn::LoraConfig fsdp_lora(int64_t r = 4) {
  nn::LoraConfig lc;
  lc.r = r;
  lc.alpha = 8;
  lc.dropout = 0.0;
  return lc;
}

// The QLoRA model every rank builds alike: NF4 decoder linears (quantised as each layer is built), LoRA on them.
inline std::shared_ptr<nn::Llama> fsdp_model(uint64_t seed, Device device = kCPU, int64_t lora_r = 4,
                                             DType dtype = DType::f32) {
  nn::LlamaOptions lo;
  lo.seed = seed;
  lo.device = device;
  lo.dtype = dtype;  // the adapters stay f32
  lo.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto m = std::make_shared<nn::Llama>(fsdp_config(), lo);
  nn::apply_lora(*m, fsdp_lora(lora_r), seed + 1);
  m->train();
  return m;
}

// n documents of 10..39 random ids, each with a masked prefix.
inline std::vector<data::Document> fsdp_docs(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Document> docs(static_cast<size_t>(n));
  for (data::Document& d : docs) {
    const size_t len = 10 + data::bounded_draw(rng, 30), prompt = data::bounded_draw(rng, len / 2);
    for (size_t i = 0; i < len; ++i) {
      d.ids.push_back(static_cast<int32_t>(3 + data::bounded_draw(rng, 197)));
      d.loss.push_back(i > prompt ? 1 : 0);
    }
  }
  return docs;
}

struct FsdpRun {
  int world = 1;
  bool shard = true;          // false: plain data parallel (one process without a group when world is 1)
  int64_t batch = 12;         // rows per rank and micro-batch
  int64_t grad_accum = 1;
  int64_t steps = 20;         // 0: until the data ends
  int64_t epochs = -1;
  int64_t seq_len = 8;
  bool checkpointing = false;
  dist::FullyShardOptions fsdp = [] {
    dist::FullyShardOptions o;
    o.replicate_below = 100;  // k/v lora_B (24 x 4) and the norms replicated, the rest sharded
    return o;
  }();
  Device device = kCPU;
  DType dtype = DType::f32;   // of the base and the activations
  std::string output;         // "": no checkpoints
  bool resume = false;
  std::vector<data::Document> eval_docs;  // held-out documents: eval every 10 steps
  std::string adapter_dir;    // set: the final adapter is written there (PEFT folder)
  uint64_t seed = 0;
};

struct FsdpResult {
  std::vector<double> losses, eval_losses;
  nn::StateDict adapter;  // full tensors, by parameter name
  int64_t last_step = 0;
};

inline FsdpResult fsdp_train(const std::vector<data::Document>& docs, const FsdpRun& s) {
  FsdpResult result;
  std::mutex mutex;
  auto body = [&](std::shared_ptr<dist::ProcessGroup> group) {
    auto model = fsdp_model(s.seed, s.device, 4, s.dtype);
    model->set_checkpoint_activations(s.checkpointing);
    std::shared_ptr<dist::FsdpUnit> root;
    if (group && s.shard) root = dist::shard_llama(*model, group, s.fsdp);
    nn::AdamWOptions ao;
    ao.lr = 1e-2;
    ao.weight_decay = 0.01;
    nn::AdamW optimizer(model->named_trainable_parameters(), ao);
    data::PackOptions po;
    po.seq_len = s.seq_len;
    po.batch_size = s.batch;
    po.seed = s.seed;
    po.epochs = s.epochs;
    data::PackedDataset data(docs, po);
    train::TrainerOptions o;
    o.max_steps = s.steps;
    o.grad_accum = s.grad_accum;
    o.device = s.device;
    o.output = s.output;
    o.lora = fsdp_lora();
    if (!s.eval_docs.empty()) {
      data::PackOptions eo;
      eo.seq_len = s.seq_len;
      eo.batch_size = 3;
      eo.shuffle = false;
      eo.epochs = 1;
      o.eval_data = std::make_shared<data::PackedDataset>(s.eval_docs, eo);
      o.eval_every = 10;
    }
    if (group) o.parallel = std::make_shared<dist::FsdpParallel>(group, s.device, root);
    train::Trainer trainer(*model, optimizer, data, o);
    if (s.resume) KILN_CHECK(trainer.resume_latest().has_value(), "fsdp test", "no checkpoint in {}", s.output);
    const train::FitResult fit = trainer.fit();
    if (!s.adapter_dir.empty()) {
      if (root) dist::save_adapter_sharded(*root, *model, fsdp_lora(), s.adapter_dir);
      else if (!group || group->rank() == 0) nn::save_adapter(*model, fsdp_lora(), s.adapter_dir);
    }
    nn::StateDict adapter;
    if (root) {
      adapter = dist::gather_trainable_state(*root, *model);
    } else {
      for (const auto& [name, p] : model->named_trainable_parameters()) adapter[name] = p.detach().clone();
    }
    if (!group || group->rank() == 0) {
      std::lock_guard<std::mutex> lock(mutex);
      result.losses = fit.losses;
      result.eval_losses = fit.eval_losses;
      result.adapter = adapter;
      result.last_step = fit.last_step;
    }
  };
  if (s.world == 1 && !s.shard) {
    body(nullptr);
  } else {
    dist::run_local(s.world, [&](dist::ProcessGroup& pg) {
      body(std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {}));  // run_local owns it
    });
  }
  return result;
}

}  // namespace kiln::test

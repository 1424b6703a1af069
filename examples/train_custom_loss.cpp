// Trains the tiny Llama (random weights, LoRA adapters) through train::Trainer with a loss of its own:
// token cross-entropy plus PaLM's z-loss, written with kiln ops and run chunk by chunk by the chunked
// linear+loss head (its gradient comes from autograd). 20 steps on a few chapters: seconds on a CPU.
#include <cstdio>

#include "data/default_corpus.h"
#include "nn/chunked_loss.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/optim.h"
#include "train/trainer.h"

using namespace kiln;

// One chunk: logits (n, V) f32 and targets (n) -> per-token losses (n). The head zeroes ignored tokens.
Tensor cross_entropy_z_loss(const Tensor& logits, const Tensor& targets) {
  Tensor nll = cross_entropy(logits, targets, -100, Reduction::none);  // (n)
  Tensor z = square(logsumexp(logits, {-1}));                          // (n): pushes log Z towards 0
  return nll + z * 1e-4;
}

// Prints each step's loss.
struct PrintLoss : train::Callback {
  void on_step_end(train::Trainer&, const train::StepInfo& s) override {
    std::printf("step %2lld  loss %.4f  lr %.2e  %.0f tok/s\n", static_cast<long long>(s.step), s.loss, s.lr, s.tokens_per_s);
  }
};

int main() try {
  const data::Tokenizer tok = data::Tokenizer::from_file(data::default_tokenizer_path());
  auto chapters = data::load_documents(data::kjv_corpus_path(), data::default_corpus_options());
  chapters.resize(std::min<size_t>(chapters.size(), 32));
  data::PackedDataset train_data(data::tokenize_documents(tok, chapters), {.seq_len = 64, .batch_size = 4, .pad_id = tok.eos_id()});

  auto model = std::make_shared<nn::Llama>(nn::LlamaConfig::named("tiny"));  // random weights, f32, CPU
  nn::LoraConfig lora;  // q, k, v, o, gate, up and down projections
  lora.r = 8;
  lora.dropout = 0.05;
  nn::apply_lora(*model, lora, /*seed=*/1);
  model->train();
  nn::AdamW optimizer(model->named_trainable_parameters(), {.lr = 3e-3, .weight_decay = 0.0});

  train::TrainerOptions o;
  o.max_steps = 20;
  o.schedule.emplace("cosine", 3e-3, /*warmup=*/2, o.max_steps);
  o.loss = [](nn::Module& m, const data::Batch& b) {  // the SUM over the batch's loss tokens
    auto& llama = dynamic_cast<nn::Llama&>(m);
    nn::ChunkedLossOptions sum;
    sum.reduction = Reduction::sum;
    return nn::chunked_linear_loss(llama.forward(b.input_ids), llama.lm_head_weight(), b.labels, cross_entropy_z_loss, sum);
  };
  train::Trainer trainer(*model, optimizer, train_data, o);
  trainer.add_callback(std::make_shared<PrintLoss>());
  const train::FitResult r = trainer.fit();
  std::printf("cross-entropy + z-loss: %.4f -> %.4f in %lld steps\n", r.losses.front(), r.losses.back(),
              static_cast<long long>(r.last_step));
  return r.losses.back() < r.losses.front() ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_custom_loss: %s\n", e.what());
  return 1;
}

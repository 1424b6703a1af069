// The fine-tuning loop behind `kiln finetune` (see finetune.h) and its subcommand.
#include "examples/kiln/finetune.h"
#include "core/file_io.h"

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/grad_mode.h"
#include "core/cuda/runtime.h"
#include "data/default_corpus.h"
#include "examples/kiln/app.h"
#include "examples/kiln/checkpoint.h"
#include "examples/kiln/progress.h"
#include "nn/generate.h"
#include "nn/lr_schedule.h"
#include "nn/optim.h"

namespace kiln::app {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void on_sigint(int) {
  g_interrupted = true;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C stops at once
}

data::TextOptions text_options(const FinetuneConfig& c) {
  if (c.text_split == "auto") return c.data.empty() ? data::default_corpus_options() : data::TextOptions{};
  data::TextOptions o;
  o.split = c.text_split == "file" ? data::TextSplit::whole_file
            : c.text_split == "blank_lines" ? data::TextSplit::blank_lines
                                            : data::TextSplit::separator;
  return o;
}

// Summed cross-entropy of hidden (B, T, H) against targets (B, T) (-100 ignored), in f32.
Tensor loss_sum(nn::Llama& model, const Tensor& hidden, const Tensor& targets, bool chunked) {
  return chunked ? model.chunked_loss(hidden, targets, Reduction::sum) : model.loss(hidden, targets, Reduction::sum);
}

// Token-weighted mean loss over up to `max_batches` batches of the held-out documents.
double eval_loss(nn::Llama& model, const std::vector<data::Document>& docs, const FinetuneConfig& c, Device device) {
  if (docs.empty()) return NAN;
  data::PackOptions po;
  po.seq_len = c.seq_len;
  po.batch_size = c.batch_size;
  po.shuffle = false;
  po.epochs = 1;
  data::PackedDataset ds(docs, po);
  autograd::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  double total = 0;
  int64_t tokens = 0;
  for (int64_t b = 0; b < c.eval_batches; ++b) {
    auto batch = ds.next();
    if (!batch || batch->n_loss_tokens == 0) break;
    Tensor h = model.forward(to_device(batch->input_ids, device));
    total += loss_sum(model, h, to_device(batch->labels, device), c.chunked_head).item<double>();
    tokens += batch->n_loss_tokens;
  }
  model.train(was_training);
  return tokens > 0 ? total / static_cast<double>(tokens) : NAN;
}

}  // namespace

FinetuneResult run_finetune(const FinetuneConfig& c, const FinetuneHooks& hooks) {
  c.validate();
  fs::create_directories(c.output);
  write_file_atomic((fs::path(c.output) / "config.toml").string(), c.to_toml(), "finetune");
  FinetuneResult result;

  // ---- model (NF4 base for QLoRA, quantised layer by layer as it loads), tokenizer, LoRA
  ModelSpec spec;
  spec.model_dir = c.model_dir;
  spec.config = c.model_dir.empty() ? c.config : "";
  spec.seed = c.seed;
  spec.dtype = c.dtype;
  spec.device = c.device;
  spec.nf4 = c.base == "nf4";
  const Device device = resolve_device(c.device);
  if (device.is_cuda()) cuda::set_device(device.index);
  auto model = load_model(spec);
  const data::Tokenizer tok = load_tokenizer(c.tokenizer, c.model_dir);
  KILN_CHECK(tok.vocab_size() <= model->config().vocab_size, "finetune",
             "the tokenizer has {} ids, more than the model's vocabulary of {}", tok.vocab_size(), model->config().vocab_size);
  nn::LoraConfig lora;
  lora.r = c.lora_r;
  lora.alpha = c.lora_alpha;
  lora.dropout = c.lora_dropout;
  lora.use_rslora = c.rslora;
  lora.target_modules = c.target_modules;
  lora.base_model_name_or_path = c.model_dir.empty() ? c.config : c.model_dir;
  nn::apply_lora(*model, lora, c.seed + 1);
  model->set_checkpoint_activations(c.checkpointing);
  model->train();

  // ---- data: documents -> tokens -> held-out split -> packed training stream
  const std::string data_path = c.data.empty() ? data::default_corpus_path() : c.data;
  const auto docs = data::tokenize_documents(tok, data::load_documents(data_path, text_options(c)));
  KILN_CHECK(!docs.empty(), "finetune", "{} holds no documents", data_path);
  data::SplitOptions so;
  so.fraction = c.eval_fraction;
  so.seed = c.seed;
  const data::Split split = data::split_indices(static_cast<int64_t>(docs.size()), so);
  const auto eval_docs = data::select_documents(docs, split.eval);
  data::PackOptions po;
  po.seq_len = c.seq_len;
  po.batch_size = c.batch_size;
  po.seed = c.seed;
  po.epochs = c.steps > 0 ? -1 : c.epochs;
  po.pad_id = tok.eos_id();
  data::PackedDataset train(data::select_documents(docs, split.train), po);
  KILN_CHECK(train.rows_per_epoch() > 0, "finetune", "{} has too few tokens for one sequence", data_path);
  const int64_t per_step = c.batch_size * c.grad_accum;
  const int64_t total_steps = c.steps > 0 ? c.steps : (train.rows_per_epoch() * c.epochs + per_step - 1) / per_step;

  // ---- optimiser, schedule, resume
  nn::AdamWOptions ao;
  ao.lr = c.lr;
  ao.weight_decay = c.weight_decay;
  nn::AdamW opt(model->named_trainable_parameters(), ao);
  const nn::LRSchedule schedule(c.schedule, c.lr, std::min(c.warmup, total_steps), total_steps);  // short runs: warmup fits
  manual_seed(data::mix_seed(c.seed, 7));  // dropout draws
  TrainerState state;
  state.fingerprint = c.fingerprint();
  if (c.resume) {
    const auto dir = latest_checkpoint(c.output);
    KILN_CHECK(dir.has_value(), "finetune", "--resume: no checkpoint in {} (no 'latest' file)", c.output);
    state = load_checkpoint(*dir, *model, opt, c.fingerprint());
    train.restore(state.data);
    default_generator().set_state(state.rng);
    if (!hooks.quiet) std::fprintf(stderr, "resumed from %s at step %lld\n", dir->c_str(), static_cast<long long>(state.step));
  } else if (fs::exists(fs::path(c.output) / "latest") && !hooks.quiet) {
    std::fprintf(stderr, "note: %s holds an earlier run; starting a new one over it (--resume continues the old one)\n",
                 c.output.c_str());
  }
  result.first_step = state.step;
  MetricsLog metrics((fs::path(c.output) / "metrics.jsonl").string(), c.resume);
  const std::string svg_path = (fs::path(c.output) / "loss_curve.svg").string();

  if (!hooks.quiet)
    std::fprintf(stderr, "kiln finetune: %s, %s base, LoRA r=%lld on %s | %lld trainable + %lld base parameters | %zu train + %zu eval docs, "
                 "%lld tokens/epoch | %lld steps of %lld x %lld tokens -> %s\n",
                 c.model_dir.empty() ? c.config.c_str() : c.model_dir.c_str(), c.base.c_str(), static_cast<long long>(c.lora_r),
                 device.str().c_str(), static_cast<long long>(model->num_parameters(true)),
                 static_cast<long long>(model->config().num_parameters()), split.train.size(), split.eval.size(),
                 static_cast<long long>(train.tokens_per_epoch()), static_cast<long long>(total_steps),
                 static_cast<long long>(per_step), static_cast<long long>(c.seq_len), c.output.c_str());

  // ---- the loop
  g_interrupted = false;
  auto previous_handler = std::signal(SIGINT, on_sigint);
  ProgressBar bar(total_steps, state.step);
  auto window_start = std::chrono::steady_clock::now();
  int64_t window_tokens = 0;
  auto checkpoint = [&] {
    state.data = train.position();
    state.rng = default_generator().state();
    result.checkpoint = save_checkpoint(c.output, *model, lora, opt, state);
  };
  try {
    while (state.step < total_steps) {
      // The micro-batches of this step, fetched first so the loss is a mean over all their tokens.
      std::vector<data::Batch> micro;
      int64_t step_tokens = 0;
      for (int64_t m = 0; m < c.grad_accum; ++m) {
        auto b = train.next();
        if (!b) break;
        step_tokens += b->n_loss_tokens;
        micro.push_back(std::move(*b));
      }
      if (micro.empty()) break;  // the epochs are done
      opt.set_lr(schedule.lr_at(state.step));
      double step_loss = 0;
      for (const data::Batch& b : micro) {
        if (b.n_loss_tokens == 0) continue;
        Tensor h = model->forward(to_device(b.input_ids, device));  // (B, T, hidden)
        Tensor loss = div(loss_sum(*model, h, to_device(b.labels, device), c.chunked_head), static_cast<double>(step_tokens));
        loss.backward();
        step_loss += loss.item<double>();
      }
      const double grad_norm = c.clip > 0 ? nn::clip_grad_norm_(model->named_trainable_parameters(), c.clip) : 0.0;
      opt.step();
      opt.zero_grad();
      ++state.step;
      state.tokens += step_tokens;
      window_tokens += c.batch_size * c.seq_len * static_cast<int64_t>(micro.size());
      result.losses.push_back(step_loss);
      state.train_losses.push_back({state.step, step_loss});

      const bool log = state.step % std::max<int64_t>(c.log_every, 1) == 0 || state.step == total_steps;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
      const double tps = secs > 0 ? static_cast<double>(window_tokens) / secs : 0.0;
      const double mem = memory_gib(device.is_cuda());
      if (!hooks.quiet) bar.update(state.step, step_loss, opt.lr(), tps, mem, log);
      if (log) {
        metrics.write(json{{"step", state.step}, {"loss", step_loss}, {"lr", opt.lr()}, {"grad_norm", grad_norm},
                           {"tokens_per_s", tps}, {"mem_gib", mem}, {"tokens", state.tokens}}.dump());
        window_start = std::chrono::steady_clock::now();
        window_tokens = 0;
      }
      if (c.eval_every > 0 && (state.step % c.eval_every == 0 || state.step == total_steps) && !eval_docs.empty()) {
        const double el = eval_loss(*model, eval_docs, c, device);
        result.eval_losses.push_back(el);
        state.eval_losses.push_back({state.step, el});
        metrics.write(json{{"step", state.step}, {"eval_loss", el}}.dump());
        if (!hooks.quiet && !log) bar.update(state.step, step_loss, opt.lr(), tps, mem, true);
        if (!hooks.quiet) std::fprintf(stderr, "%seval loss %.4f at step %lld\n", isatty(fileno(stderr)) ? "\n" : "", el,
                                       static_cast<long long>(state.step));
      }
      if (log) write_loss_svg(svg_path, state.train_losses, state.eval_losses);
      const bool stop = g_interrupted || (hooks.stop_after_steps > 0 && state.step - result.first_step >= hooks.stop_after_steps);
      if (stop || (c.save_every > 0 && state.step % c.save_every == 0)) checkpoint();
      if (stop) {
        result.interrupted = true;
        break;
      }
    }
  } catch (...) {
    std::signal(SIGINT, previous_handler);
    throw;
  }
  std::signal(SIGINT, previous_handler);
  if (!hooks.quiet) bar.finish();
  if (!result.interrupted && (result.checkpoint.empty() || state.step % std::max<int64_t>(c.save_every, 1) != 0)) checkpoint();
  write_loss_svg(svg_path, state.train_losses, state.eval_losses);
  nn::save_adapter(*model, lora, (fs::path(c.output) / "adapter").string());
  result.last_step = state.step;
  if (result.interrupted) {
    if (!hooks.quiet) std::fprintf(stderr, "interrupted: checkpoint %s (continue with --resume)\n", result.checkpoint.c_str());
    return result;
  }

  // ---- a sample from the fine-tuned model
  if (c.sample_tokens > 0) {
    nn::GenerateOptions go;
    go.max_new_tokens = c.sample_tokens;
    go.temperature = 0.7;
    go.top_p = 0.9;
    go.seed = c.seed;
    go.stop_tokens = {tok.eos_id(), tok.eot_id()};
    go.token_limit = tok.vocab_size();
    std::vector<int64_t> prompt;
    for (int32_t id : tok.encode(c.sample_prompt, /*add_bos=*/true)) prompt.push_back(id);
    const auto out = nn::generate(*model, prompt, go);
    std::vector<int32_t> ids(out.begin(), out.end());
    result.sample = c.sample_prompt + tok.decode(ids, /*skip_special=*/true);
    write_file_atomic((fs::path(c.output) / "sample.txt").string(), result.sample + "\n", "finetune");
    if (!hooks.quiet) std::printf("sample: %s\n", result.sample.c_str());
  }
  if (!hooks.quiet)
    std::fprintf(stderr, "done: %lld steps, adapter in %s/adapter, metrics.jsonl and loss_curve.svg next to it\n",
                 static_cast<long long>(state.step), c.output.c_str());
  return result;
}

void add_finetune_command(CLI::App& app) {
  auto config = std::make_shared<FinetuneConfig>();
  CLI::App* cmd = app.add_subcommand("finetune", "QLoRA/LoRA fine-tuning (no arguments: the default job on the embedded corpus)");
  add_finetune_options(*cmd, *config);
  cmd->callback([cmd, config] {
    if (!config->config_file.empty()) {
      // The file first, then every flag given on the command line over it.
      FinetuneConfig merged;
      merged.load_toml(config->config_file);
      FinetuneConfig flags = *config;
      *config = merged;
      apply_given_flags(*cmd, flags, *config);
      config->config_file = flags.config_file;
    }
    if (run_finetune(*config).interrupted) throw CLI::RuntimeError(130);  // Ctrl-C: the shell's convention
  });
}

}  // namespace kiln::app

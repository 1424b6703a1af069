// `kiln finetune` (see finetune.h): the parts built from the settings, the Trainer over them, and the
// subcommand with its terminal output and Ctrl-C handling.
#include "examples/kiln/finetune.h"

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "compile/compile.h"
#include "core/cuda/runtime.h"
#include "core/file_io.h"
#include "data/default_corpus.h"
#include "dist/fsdp_parallel.h"
#include "dist/init.h"
#include "dist/local.h"
#include "dist/sharded_checkpoint.h"
#include "examples/kiln/adapter_base.h"
#include "examples/kiln/app.h"
#include "examples/kiln/export.h"
#include "examples/kiln/generate.h"
#include "examples/kiln/memory_check.h"
#include "nn/generate.h"
#include "nn/lr_schedule.h"
#include "train/progress.h"

namespace kiln::app {

namespace fs = std::filesystem;

namespace {

data::TextOptions text_options(const FinetuneConfig& c) {
  if (c.text_split == "auto") return c.data.empty() ? data::default_corpus_options() : data::TextOptions{};
  data::TextOptions o;
  o.split = c.text_split == "file" ? data::TextSplit::whole_file
            : c.text_split == "blank_lines" ? data::TextSplit::blank_lines
                                            : data::TextSplit::separator;
  return o;
}

// Ctrl-C asks the running trainer to stop (it finishes the step and writes a checkpoint); a second
// Ctrl-C stops at once.
std::atomic<train::Trainer*> g_trainer{nullptr};

extern "C" void on_sigint(int) {
  if (train::Trainer* t = g_trainer.load()) t->request_stop();
  std::signal(SIGINT, SIG_DFL);
}

struct SigintScope {
  explicit SigintScope(train::Trainer& t) {
    g_trainer = &t;
    previous_ = std::signal(SIGINT, on_sigint);
  }
  ~SigintScope() {
    std::signal(SIGINT, previous_);
    g_trainer = nullptr;
  }
  SigintScope(const SigintScope&) = delete;
  SigintScope& operator=(const SigintScope&) = delete;
  void (*previous_)(int);
};

// The output folder made and checked before anything slow runs: a kiln error naming the path (not a raw
// filesystem error), and on rank 0 a test write, so an unwritable place fails now, not at the first checkpoint.
void prepare_output(const std::string& output, bool lead) {
  std::error_code ec;
  fs::create_directories(output, ec);
  KILN_CHECK(!ec, "finetune", "cannot create the output folder {:?}: {} (give a writable place with --output)", output,
             ec.message());
  KILN_CHECK(fs::is_directory(output, ec), "finetune", "--output {:?} is not a folder", output);
  if (!lead) return;
  const fs::path probe = fs::path(output) / ".kiln-write-test";
  bool ok = false;
  {
    std::ofstream f(probe);
    ok = f.good() && static_cast<bool>(f << "kiln\n") && static_cast<bool>(f.flush());
  }
  fs::remove(probe, ec);
  KILN_CHECK(ok, "finetune", "cannot write into the output folder {:?} (give a writable place with --output)", output);
}

// The model's config.json (or named config), read before the model itself to check memory and lengths.
nn::LlamaConfig model_config(const FinetuneConfig& c, const std::string& model_dir) {
  return model_dir.empty() ? nn::LlamaConfig::named(c.config)
                           : nn::LlamaConfig::from_file((fs::path(model_dir) / "config.json").string());
}

// The fingerprint a resume is checked against. Checkpoints written before --steps and --epochs left the
// fingerprint carry them ("steps=N;epochs=M;" before "lr="): such a run is checked in that form, with the
// checkpoint's own values, so it still resumes (and extends).
std::string resume_fingerprint(const FinetuneConfig& c) {
  const std::string now = c.fingerprint();
  if (!c.resume) return now;
  const std::optional<std::string> dir = train::latest_checkpoint(c.output);
  const fs::path state = dir ? fs::path(*dir) / "trainer_state.json" : fs::path();
  if (!dir || !fs::exists(state)) return now;  // the resume itself reports what is missing
  const std::string saved = train::TrainerState::from_json(read_file(state.string(), "finetune"), state.string()).fingerprint;
  const size_t from = saved.find(";steps="), to = saved.find(";lr="), at = now.find(";lr=");
  if (from == std::string::npos || to == std::string::npos || to < from || at == std::string::npos) return now;
  return now.substr(0, at) + saved.substr(from, to - from) + now.substr(at);
}

// What kiln generate/eval --adapter need to load the same base (adapter_base.h).
AdapterBase adapter_base(const FinetuneConfig& c, const std::string& model_dir, DType built) {
  auto absolute = [](const std::string& p) { return p.empty() ? p : fs::absolute(p).lexically_normal().string(); };
  AdapterBase b;
  b.model_dir = absolute(model_dir);
  if (model_dir.empty()) b.config = fs::exists(c.config) ? absolute(c.config) : c.config;
  b.seed = c.seed;
  b.nf4 = c.base == "nf4";
  b.tokenizer = absolute(c.tokenizer);
  b.dtype = dtype_name(built);
  return b;
}

// Writes kiln_base.json into each checkpoint's adapter folder as it is saved (rank 0).
class AdapterBaseCallback final : public train::Callback {
 public:
  explicit AdapterBaseCallback(AdapterBase base) : base_(std::move(base)) {}
  void on_save(train::Trainer&, const train::SaveInfo& info) override {
    const fs::path adapter = fs::path(info.path) / "adapter";
    if (fs::is_directory(adapter)) write_adapter_base(adapter.string(), base_);
  }

 private:
  AdapterBase base_;
};

}  // namespace

FinetuneJob::FinetuneJob(const FinetuneConfig& c, RunWorld world)
    : config_(c), world_(std::move(world)), device_(world_.group ? world_.device : resolve_device(c.device)) {
  c.validate();
  KILN_CHECK(!c.offload || device_.is_cuda(), "finetune",
             "--offload keeps activations in host memory instead of a GPU's; on {} they are there already: drop it",
             device_.str());
  model_dir_ = c.base_model_dir();
  if (c.shard && !world_.group) world_.group = dist::make_local_groups(1)[0];  // fully_shard over a world of one
  const bool lead = world_.rank() == 0;
  prepare_output(c.output, lead);

  // ---- before anything large is allocated: does one step fit in memory (CPU), are the lengths in range
  const nn::LlamaConfig mc = model_config(c, model_dir_);
  const bool plan_memory = c.plans_memory(world_.size());
  KILN_CHECK(!plan_memory || (world_.size() == 1 && !c.shard), "finetune",
             "--memory-budget plans for one unsharded process; with {} rank(s){} use --checkpointing instead",
             world_.size(), c.shard ? " and --shard" : "");
  KILN_CHECK(c.host_memory_budget == 0 || device_.is_cuda(), "finetune",
             "--host-memory-budget limits the host memory a GPU's memory plan offloads to; on {} nothing is offloaded: "
             "drop it", device_.str());
  KILN_CHECK(c.host_memory_budget == 0 || plan_memory, "finetune",
             "--host-memory-budget applies to a memory plan; with --checkpointing, --offload offloads every block");
  if (!device_.is_cuda()) {
    FinetuneConfig least = c;  // a memory plan may checkpoint every block
    least.checkpointing = least.checkpointing || plan_memory;
    if (const std::optional<double> available = available_host_memory())
      check_step_fits(mc, least, resolve_dtype(c.dtype, device_), *available);
  }
  if (c.seq_len > mc.max_position_embeddings)
    notes_.push_back(fmt::format("warning: --seq-len {} is longer than the model's max_position_embeddings of {}: "
                                 "positions past it were never trained (RoPE)",
                                 c.seq_len, mc.max_position_embeddings));

  // ---- model (NF4 base for QLoRA, quantised layer by layer as it loads), tokenizer, LoRA
  ModelSpec spec;
  spec.model_dir = model_dir_;
  spec.config = model_dir_.empty() ? c.config : "";
  spec.seed = c.seed;
  spec.dtype = c.dtype;
  spec.device = device_.str();
  spec.nf4 = c.base == "nf4";
  if (device_.is_cuda()) cuda::set_device(device_.index);
  model_ = load_model(spec);
  tokenizer_ = std::make_unique<data::Tokenizer>(load_tokenizer(c.tokenizer, model_dir_));
  KILN_CHECK(tokenizer_->vocab_size() <= model_->config().vocab_size, "finetune",
             "the tokenizer has {} ids, more than the model's vocabulary of {}", tokenizer_->vocab_size(),
             model_->config().vocab_size);
  lora_.r = c.lora_r;
  lora_.alpha = c.lora_alpha;
  lora_.dropout = c.lora_dropout;
  lora_.use_rslora = c.rslora;
  lora_.target_modules = c.target_modules;
  lora_.base_model_name_or_path = model_dir_.empty() ? c.config : model_dir_;
  if (c.full) {
    for (auto& [name, p] : model_->named_parameters()) p.set_requires_grad(true);
  } else {
    nn::apply_lora(*model_, lora_, c.seed + 1);
  }
  const int64_t layers = model_->config().num_hidden_layers;
  model_->set_layer_activations(
      c.segment_layers > 0
          ? nn::in_segments(layers, c.segment_layers, c.offload ? layers : 0)
          : std::vector<nn::LayerActivations>(static_cast<size_t>(layers), c.offload       ? nn::LayerActivations::offload
                                                                           : c.checkpointing ? nn::LayerActivations::checkpoint
                                                                                             : nn::LayerActivations::keep));
  model_->set_mlp_chunk(c.mlp_chunk);
  model_->train();
  if (c.shard) shards_ = dist::shard_llama(*model_, world_.group);  // each decoder layer, then the root

  // ---- data: documents -> tokens -> held-out split -> packed training stream and eval batches
  data_path_ = c.data.empty() ? data::default_corpus_path() : c.data;
  const auto docs = data::tokenize_documents(*tokenizer_, data::load_documents(data_path_, text_options(c)));
  KILN_CHECK(!docs.empty(), "finetune", "{} holds no documents", data_path_);
  data::SplitOptions so;
  so.fraction = c.eval_fraction;
  so.seed = c.seed;
  const data::Split split = data::split_indices(static_cast<int64_t>(docs.size()), so);
  n_train_docs_ = split.train.size();
  n_eval_docs_ = split.eval.size();
  data::PackOptions po;
  po.seq_len = c.seq_len;
  po.batch_size = c.batch_size;
  po.seed = c.seed;
  po.epochs = c.steps > 0 ? -1 : c.epochs;
  po.pad_id = tokenizer_->eos_id();
  train_data_ = std::make_unique<data::PackedDataset>(data::select_documents(docs, split.train), po);
  KILN_CHECK(train_data_->rows_per_epoch() > 0, "finetune", "{} has too few tokens for one sequence", data_path_);
  const int64_t per_step = c.batch_size * c.grad_accum;
  total_steps_ = c.steps > 0 ? c.steps : (train_data_->rows_per_epoch() * c.epochs + per_step - 1) / per_step;

  // ---- optimiser, schedule, trainer, resume
  nn::AdamWOptions ao;
  ao.lr = c.lr;
  ao.weight_decay = c.weight_decay;
  optimizer_ = std::make_unique<nn::AdamW>(model_->named_trainable_parameters(), ao);
  train::TrainerOptions to;
  to.max_steps = total_steps_;
  to.grad_accum = c.grad_accum;
  to.clip = c.clip;
  to.skip_nonfinite_steps = c.skip_nonfinite_steps;
  to.schedule.emplace(c.schedule, c.lr, std::min(c.warmup, total_steps_), total_steps_);  // short runs: warmup fits
  if (plan_memory) {  // the default loss (the chunked head) with a plan of checkpoints and loss chunk
    auto bytes = [](double gib) { return gib > 0 ? static_cast<size_t>(gib * static_cast<double>(size_t{1} << 30)) : 0; };
    to.memory_budget = bytes(c.memory_budget);
    to.memory_plan_options.host_budget_bytes = bytes(c.host_memory_budget);
  } else {
    to.loss = train::llama_loss(c.chunked_head);
  }
  if (c.compile) to.compile = compile::trainer_compile();
  to.device = device_;
  to.seed = data::mix_seed(c.seed, 7);  // dropout draws
  if (!split.eval.empty()) {
    data::PackOptions eo;
    eo.seq_len = c.seq_len;
    eo.batch_size = c.batch_size;
    eo.shuffle = false;
    eo.epochs = 1;
    to.eval_data = std::make_shared<data::PackedDataset>(data::select_documents(docs, split.eval), eo);
  }
  to.eval_every = c.eval_every;
  to.eval_batches = c.eval_batches;
  to.output = c.output;
  to.save_every = c.save_every;
  if (!c.full) to.lora = lora_;  // else checkpoints hold every trainable weight
  to.fingerprint = resume_fingerprint(c);
  to.log_every = std::max<int64_t>(c.log_every, 1);
  if (world_.group) to.parallel = std::make_shared<dist::FsdpParallel>(world_.group, device_, shards_);
  trainer_ = std::make_unique<train::Trainer>(*model_, *optimizer_, *train_data_, std::move(to));
  if (c.resume) {
    resumed_from_ = trainer_->resume_latest();
    KILN_CHECK(resumed_from_.has_value(), "finetune", "--resume: no checkpoint in {} (no 'latest' file)", c.output);
    const int64_t done = trainer_->state().step;
    KILN_CHECK(done < total_steps_, "finetune",
               "--resume: {} is at step {}, and this run ends at step {}: nothing to train (give --steps > {} to "
               "extend it)",
               *resumed_from_, done, total_steps_, done);
    // An extended run: the LR schedule is recomputed over the new total (it does not stay at its old end).
    const fs::path old_settings = fs::path(c.output) / "config.toml";
    if (fs::exists(old_settings)) {
      FinetuneConfig before;
      before.load_toml(old_settings.string());
      if (before.steps != c.steps || before.epochs != c.epochs)
        notes_.push_back(fmt::format("note: extending the run to {} steps: the {} LR schedule now spans them (lr {:.3g} "
                                     "at step {})",
                                     total_steps_, c.schedule, trainer_->options().schedule->lr_at(done), done + 1));
    }
  }
  if (lead) {
    trainer_->add_callback(std::make_shared<train::MetricsCallback>(c.output, c.resume, "kiln finetune: loss"));
    if (!c.full) trainer_->add_callback(std::make_shared<AdapterBaseCallback>(adapter_base(c, model_dir_, resolve_dtype(c.dtype, device_))));
    // Written last: a start refused above (a failed --resume, bad data, too little memory) leaves the
    // run folder's settings as they were.
    write_file_atomic((fs::path(c.output) / "config.toml").string(), c.to_toml(), "finetune");
  }
}

FinetuneJob::~FinetuneJob() = default;

std::string FinetuneJob::banner() const {
  const FinetuneConfig& c = config_;
  const std::string ranks =
      world_.size() > 1 ? fmt::format(" x {} ranks ({})", world_.size(), shards_ ? "sharded" : "data parallel")
                        : (shards_ ? std::string(" (sharded)") : std::string());
  // Parameter counts from the config and LoRA's shapes (a sharded model holds 1/N of them).
  int64_t trainable = 0;
  for (const auto& [path, l] : nn::lora_layers(*model_)) trainable += lora_.r * (l->in_features() + l->out_features());
  if (c.full) trainable = model_->config().num_parameters();
  const std::string what = c.full ? std::string("full training") : fmt::format("LoRA r={}", c.lora_r);
  return fmt::format("kiln finetune: {}, {} base, {} on {}{} | {} trainable + {} base parameters | {} train + {} eval "
                     "docs of {}, {} tokens/epoch | {} steps of {} x {} tokens -> {}",
                     model_dir_.empty() ? c.config : model_dir_, c.base, what, device_.str(), ranks, trainable,
                     model_->config().num_parameters(), n_train_docs_, n_eval_docs_, data_path_, train_data_->tokens_per_epoch(),
                     total_steps_, c.batch_size * c.grad_accum * world_.size(), c.seq_len, c.output);
}

FinetuneResult FinetuneJob::run() {
  const train::FitResult fit = trainer_->fit();
  FinetuneResult result;
  result.losses = fit.losses;
  result.first_step = fit.first_step;
  result.last_step = fit.last_step;
  result.eval_losses = fit.eval_losses;
  result.checkpoint = fit.checkpoint;
  result.interrupted = fit.stopped;
  const bool lead = world_.rank() == 0;
  if (config_.full) {  // the whole model, as a Hugging Face folder (replicated: every rank holds it)
    if (lead)
      save_hf_folder(*model_, (fs::path(config_.output) / "model").string(), resolve_dtype(config_.dtype, device_),
                     model_dir_, config_.tokenizer);
  } else {
    const std::string adapter = (fs::path(config_.output) / "adapter").string();
    if (shards_) dist::save_adapter_sharded(*shards_, *model_, lora_, adapter);  // gathered; rank 0 writes
    else if (lead) nn::save_adapter(*model_, lora_, adapter);
    if (lead) write_adapter_base(adapter, adapter_base(config_, model_dir_, resolve_dtype(config_.dtype, device_)));
  }
  if (result.interrupted || config_.sample_tokens <= 0) return result;
  if (!shards_ && !lead) return result;  // replicated: rank 0 samples alone

  // ---- a sample from the fine-tuned model
  const data::Tokenizer& tok = *tokenizer_;
  nn::GenerateOptions go;
  go.max_new_tokens = config_.sample_tokens;
  go.temperature = 0.7;
  go.top_p = 0.9;
  go.seed = config_.seed;
  const std::vector<int64_t> stop = {tok.eos_id(), tok.eot_id()};
  // Sharded, every forward gathers: all ranks generate exactly sample_tokens tokens, cut at a stop token after.
  if (!shards_) go.stop_tokens = stop;
  go.token_limit = tok.vocab_size();
  std::vector<int64_t> prompt;
  for (int32_t id : tok.encode(config_.sample_prompt, /*add_bos=*/true)) prompt.push_back(id);
  auto out = nn::generate(*model_, prompt, go);
  auto end = std::find_first_of(out.begin(), out.end(), stop.begin(), stop.end());
  out.erase(end == out.end() ? end : end + 1, out.end());
  // valid UTF-8 (a byte token cut off at the end becomes U+FFFD), no special tokens
  result.sample = config_.sample_prompt + printable_text(tok, out);
  if (lead) write_file_atomic((fs::path(config_.output) / "sample.txt").string(), result.sample + "\n", "finetune");
  return result;
}

namespace {

FinetuneResult run_finetune_ranked(const FinetuneConfig& c) {
  c.validate();
  const bool earlier_run = !c.resume && fs::exists(fs::path(c.output) / "latest");
  FinetuneJob job(c, join_world(c, c.shard));
  if (job.world().rank() != 0) {  // the other ranks train silently; rank 0 reports for all
    SigintScope sigint(job.trainer());
    return job.run();
  }
  if (job.trainer().memory_plan()) std::fprintf(stderr, "%s\n", job.trainer().memory_plan()->describe().c_str());
  if (job.resumed_from())
    std::fprintf(stderr, "resumed from %s at step %lld\n", job.resumed_from()->c_str(),
                 static_cast<long long>(job.trainer().state().step));
  else if (earlier_run)
    std::fprintf(stderr, "note: %s holds an earlier run; starting a new one over it (--resume continues the old one)\n",
                 c.output.c_str());
  for (const std::string& note : job.notes()) std::fprintf(stderr, "%s\n", note.c_str());
  std::fprintf(stderr, "%s\n", job.banner().c_str());
  job.trainer().add_callback(std::make_shared<train::ProgressCallback>());

  FinetuneResult result;
  {
    SigintScope sigint(job.trainer());
    result = job.run();
  }
  if (result.interrupted) {
    std::fprintf(stderr, "interrupted: checkpoint %s (continue with --resume)\n", result.checkpoint.c_str());
    return result;
  }
  if (c.sample_tokens > 0) std::printf("sample: %s\n", result.sample.c_str());
  std::fprintf(stderr, "done: %lld steps, %s in %s/%s, metrics.jsonl and loss_curve.svg next to it\n",
               static_cast<long long>(result.last_step), c.full ? "the model" : "adapter", c.output.c_str(),
               c.full ? "model" : "adapter");
  return result;
}

}  // namespace

FinetuneResult run_finetune(const FinetuneConfig& c) {
  const dist::Environment env = dist::read_environment();
  try {
    return run_finetune_ranked(c);
  } catch (const std::exception& e) {
    if (env.world_size > 1) throw Error(fmt::format("rank {}: {}", env.rank, e.what()));
    throw;
  }
}

void add_finetune_command(CLI::App& app) {
  auto config = std::make_shared<FinetuneConfig>();
  auto nproc = std::make_shared<int>(1);
  CLI::App* cmd = app.add_subcommand("finetune", "QLoRA/LoRA fine-tuning (no arguments: the default job, QLoRA of kiln's "
                                     "KJV-pretrained tiny base on The Devil's Dictionary)");
  add_finetune_options(*cmd, *config);
  cmd->add_option("--nproc", *nproc, "run as N ranks on this machine (kiln launch --nproc N -- kiln finetune ...)")
      ->check(CLI::PositiveNumber);
  cmd->callback([cmd, config, nproc] {
    if (*nproc > 1) {
      const int status = relaunch_ranks(*nproc, command_line());
      if (status != 0) throw CLI::RuntimeError(status);
      return;
    }
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

// `kiln finetune`'s settings: one struct, filled from a TOML config file and/or flags (a flag wins
// over the file), validated, and written back as the run's config.toml.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kiln::app {

struct FinetuneConfig {
  // model
  std::string model_dir;          // a HF folder; or
  std::string config;             // a named config / config.json with random weights (needs --random-init);
  bool random_init = false;       // neither: kiln's default base (data/default/base, pretrained on the KJV)
  std::string tokenizer;          // tokenizer.json or folder; default: the model's, else kiln's default
  std::string base = "nf4";       // nf4 (QLoRA) | bf16 (LoRA over the model dtype)
  std::string dtype = "auto";
  std::string device = "auto";
  // LoRA
  int64_t lora_r = 16;
  double lora_alpha = 32;
  double lora_dropout = 0.0;
  bool rslora = false;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  // data
  std::string data;               // text file, folder or JSONL; default: the default corpus (Devil's Dictionary)
  std::string text_split = "auto";  // auto | file | blank_lines | separator
  double eval_fraction = 0.02;
  int64_t seq_len = 128;
  int64_t batch_size = 8;
  int64_t grad_accum = 1;
  int64_t steps = 400;            // optimizer steps (0: from epochs)
  int64_t epochs = 0;
  // optimisation
  double lr = 2e-3;
  std::string schedule = "cosine";
  int64_t warmup = 10;
  double weight_decay = 0.0;
  double clip = 1.0;
  uint64_t seed = 0;
  bool checkpointing = false;     // activation checkpointing of every block (no memory plan then)
  bool offload = false;           // with checkpointing: each block's input waits in pinned host memory (GPU)
  int64_t mlp_chunk = 0;          // long sequences: the MLP runs on at most this many tokens at a time (0: off)
  int64_t segment_layers = 0;     // with checkpointing: blocks in segments of this many (nn::LayerActivations::segment; 0: off)
  // GiB a step may hold at its peak: kiln plans which blocks to checkpoint and the loss head's chunk
  // (nn/memory_plan.h). 0: the device's free memory less a margin. Below 0 (the default): the same
  // default plan, unless --checkpointing, several ranks or --chunked-head false decide otherwise.
  double memory_budget = -1;
  // GiB of pinned host memory a GPU's memory plan may offload checkpointed blocks to (0: half of the
  // host's free memory).
  double host_memory_budget = 0;
  bool full = false;              // every parameter trainable, no LoRA (needs base bf16)
  bool skip_nonfinite_steps = false;  // a NaN/inf loss or gradient skips the step (counted) instead of stopping
  bool chunked_head = true;       // chunked linear+loss head
  bool shard = false;             // several ranks: fully_shard the model (else plain data parallel)
  bool compile = false;           // compile each decoder layer with the JIT fuser (compile/)
  // reporting and checkpoints
  int64_t eval_every = 100;
  int64_t eval_batches = 4;
  int64_t save_every = 100;
  int64_t log_every = 10;
  std::string output = "runs/default";
  bool resume = false;
  std::string sample_prompt = "LAWYER, n.";
  int64_t sample_tokens = 48;
  std::string config_file;        // TOML

  void validate() const;
  // Whether the run plans its memory (see memory_budget) in a world of `world_size` processes.
  bool plans_memory(int world_size) const;
  // The base model folder: --model, or kiln's default base when neither --model nor --config is given
  // (data::default_base_path()); "" for a --config model with random weights.
  std::string base_model_dir() const;
  std::string to_toml() const;
  // Each setting as config.toml spells it: (name, TOML value).
  std::vector<std::pair<std::string, std::string>> settings() const;
  // Applies a TOML file's keys (the names above) over the current values; unknown keys are errors.
  void load_toml(const std::string& path);
  // What must match between a run and its resume (model, LoRA, data and batch settings; not --steps or
  // --epochs: a resume may extend a run).
  std::string fingerprint() const;
};

// Adds every flag to `cmd` bound to `c` (the TOML file is applied first: see finetune.cpp).
void add_finetune_options(CLI::App& cmd, FinetuneConfig& c);
// Copies into `to` the settings whose flags were given on `cmd`'s command line, taking them from `from`.
void apply_given_flags(const CLI::App& cmd, const FinetuneConfig& from, FinetuneConfig& to);

}  // namespace kiln::app

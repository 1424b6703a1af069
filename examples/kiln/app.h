// The `kiln` command line: each subcommand (eval, finetune, generate) adds itself to the CLI11 app,
// and the model/tokenizer loading they share lives here.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "data/tokenizer.h"
#include "nn/llama.h"
#include "nn/lora.h"

namespace kiln::app {

void add_eval_command(CLI::App& app);
void add_finetune_command(CLI::App& app);
void add_generate_command(CLI::App& app);

// Where a model comes from and how it is placed.
struct ModelSpec {
  std::string model_dir;   // a HF folder (config.json + safetensors); or:
  std::string config;      // a named config ("llama3.1-8b", "tiny") or a config.json, with random weights
  uint64_t seed = 0;       // for random weights
  std::string adapter;     // a PEFT adapter folder to load (optional)
  std::string dtype = "auto";   // auto: bf16 on GPU, f32 on CPU
  std::string device = "auto";  // auto: cuda if present, else cpu
  bool nf4 = false;        // quantise the base linear layers to NF4 while loading (QLoRA)
};

// Adds --model/--config/--seed/--adapter/--dtype/--device/--nf4 to a subcommand.
void add_model_options(CLI::App& cmd, ModelSpec& spec, bool with_adapter = true);
Device resolve_device(const std::string& spec);
DType resolve_dtype(const std::string& spec, Device device);
// Builds or loads the model (and the adapter, when given); the base is frozen when an adapter is loaded.
std::shared_ptr<nn::Llama> load_model(const ModelSpec& spec);
// The tokenizer: `path` if given (a tokenizer.json or a folder holding one), else the model folder's
// tokenizer.json, else the default tokenizer shipped with kiln (data/default).
data::Tokenizer load_tokenizer(const std::string& path, const std::string& model_dir);

}  // namespace kiln::app

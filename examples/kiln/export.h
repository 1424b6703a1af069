// `kiln export`'s library half: the base built as `kiln finetune` builds it (a HF folder, or a named
// config with random weights; NF4 or not; what the adapter's kiln_base.json records by default), the
// LoRA adapter merged into it (NF4 and bnb-4bit bases dequantised; the sum computed in f32 and rounded
// once), written as a Hugging Face folder (config.json, safetensors shards with an index, generation
// and tokenizer files) or as one GGUF file for llama.cpp; or the adapter alone, unmerged, as a llama.cpp
// LoRA file (gguf-lora). Without an adapter the base alone is written.
// Nothing partial is left on an error.
#pragma once
#include <string>
#include <vector>

#include "examples/kiln/app.h"

namespace kiln::app {

void add_export_command(CLI::App& app);

struct ExportCommand {
  ModelSpec model;               // model.dtype: the dtype the base is built in (as finetune's --dtype)
  std::string tokenizer;         // tokenizer.json or its folder; default: the model's, else kiln's
  std::string output;            // hf: the folder to create; gguf: the file
  std::string dtype = "bf16";    // hf: the dtype of the written tensors (bf16, f16, f32)
  std::string format = "hf";     // hf | gguf | gguf-lora (the adapter alone, for llama.cpp's --lora)
  std::string gguf_type = "f16"; // gguf, gguf-lora: f32 | f16 | bf16 | q8_0 (1-d tensors stay f32)
  std::string max_shard_size = "5GB";
  bool overwrite = false;        // replace an existing output
  bool random_init = false;      // --random-init: says the --config base has random weights (as it always has)
};

struct ExportResult {
  std::vector<std::string> files;  // what was written, relative to the output folder (hf) or the file (gguf)
  int64_t lora_layers = 0;         // LoRA layers merged (hf, gguf) or written (gguf-lora)
};

// Runs the export; kiln::Error "[export] ..." on bad input, before anything is written.
ExportResult run_export(const ExportCommand& c);

// `model` as a Hugging Face folder `output` (built in a temporary folder next to it, then renamed over
// it): safetensors shards of at most `max_shard_size` ("5GB") in `dtype` with an index when there are
// several, config.json, `model_dir`'s generation_config.json if any, and the tokenizer files (`tokenizer`,
// else the model folder's, else kiln's default). With `nf4_as_bnb`, NF4 layers are written as a bnb-4bit
// checkpoint (config.json's quantization_config as transformers writes it) instead of dequantised.
// Returns the files written.
std::vector<std::string> save_hf_folder(nn::Llama& model, const std::string& output, DType dtype,
                                        const std::string& model_dir, const std::string& tokenizer,
                                        const std::string& max_shard_size = "5GB", bool nf4_as_bnb = false);

// Checks before any work that `output` can be written: its folder exists and is writable, and it does
// not exist (or is an empty folder) unless `overwrite`; `file`: a file is written there, else a folder.
void check_output_path(const std::string& output, bool overwrite, bool file);

}  // namespace kiln::app

// `kiln quantize`: a Hugging Face Llama folder (bf16, f16 or f32 safetensors) quantised to NF4 and written
// as a bitsandbytes-4bit folder, as transformers saves a model loaded with BitsAndBytesConfig(load_in_4bit=True,
// bnb_4bit_quant_type="nf4"): every linear layer of the decoder blocks as bnb's tensors, the rest (embeddings,
// norms, lm_head) in the compute dtype: the keys, quant_state JSON and quantization_config that transformers
// writes (tests/test_quantize.cpp compares with its output), so kiln finetune --model loads it as it is, with a
// quarter of the bf16 bytes to read at each start.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "examples/kiln/app.h"

namespace kiln::app {

struct QuantizeCommand {
  std::string model_dir;                // the folder to quantise (a bnb-4bit one is written again as it is)
  std::string output;                   // the folder to create
  std::string tokenizer;                // tokenizer.json or its folder; default: the model's, else kiln's
  std::string dtype = "bf16";           // the unquantised tensors and bnb_4bit_compute_dtype: bf16 | f16 | f32
  bool double_quant = true;             // bnb_4bit_use_double_quant (absmax as 8-bit codes)
  std::string device = "auto";          // where the weights are quantised (the bytes are the same)
  std::string max_shard_size = "5GB";
  bool overwrite = false;               // replace an existing output (only once the new one is complete)
};

struct QuantizeResult {
  int64_t nf4_layers = 0;          // linear layers written as NF4
  std::vector<std::string> files;  // relative to the output folder
};

// Runs the command; kiln::Error "[quantize] ..." (or "[export] ..." for the output) on bad input, before
// anything is written.
QuantizeResult run_quantize(const QuantizeCommand& c);

void add_quantize_command(CLI::App& app);

}  // namespace kiln::app

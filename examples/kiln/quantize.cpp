// `kiln quantize`: load a Hugging Face Llama, quantising each decoder layer's linears to NF4 as it is built
// (nn::quantize_linears_nf4, bnb's format and rounding), and write it as a bnb-4bit folder (save_hf_folder).
#include "examples/kiln/quantize.h"

#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "examples/kiln/export.h"
#include "io/shard_writer.h"
#include "nn/nf4_linear.h"

namespace kiln::app {

namespace fs = std::filesystem;

QuantizeResult run_quantize(const QuantizeCommand& c) {
  KILN_CHECK(!c.model_dir.empty(), "quantize", "give --model, the Hugging Face folder to quantise");
  KILN_CHECK(fs::exists(fs::path(c.model_dir) / "config.json"), "quantize", "{}: no config.json (a Hugging Face model folder)",
             c.model_dir);
  nn::LlamaOptions o;
  o.device = resolve_device(c.device);
  o.dtype = resolve_dtype(c.dtype, o.device);
  io::parse_byte_size(c.max_shard_size);  // a bad size is an error before the model is read
  check_output_path(c.output, c.overwrite, /*file=*/false);

  o.on_layer_built = [dq = c.double_quant](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer, dq); };
  std::shared_ptr<nn::Llama> model = nn::Llama::from_pretrained(c.model_dir, o);
  QuantizeResult r;
  for (auto& [path, m] : model->named_modules())  // quantised here, or NF4 already in a bnb-4bit source
    r.nf4_layers += dynamic_cast<const nn::NF4Linear*>(m) != nullptr;
  r.files = save_hf_folder(*model, c.output, o.dtype, c.model_dir, c.tokenizer, c.max_shard_size, /*nf4_as_bnb=*/true);
  return r;
}

void add_quantize_command(CLI::App& app) {
  auto c = std::make_shared<QuantizeCommand>();
  CLI::App* cmd = app.add_subcommand("quantize", "quantise a Hugging Face Llama folder to NF4 and write it as a bitsandbytes-4bit "
                                     "folder, as transformers saves one (kiln finetune --model loads it as it is)");
  cmd->add_option("--model", c->model_dir, "the Hugging Face folder to quantise (config.json + *.safetensors)")->required();
  cmd->add_option("--output", c->output, "the folder to create")->required();
  cmd->add_option("--tokenizer", c->tokenizer, "tokenizer.json or its folder to copy (default: the model's, else kiln's)");
  cmd->add_option("--dtype", c->dtype, "dtype of the tensors left unquantised (embeddings, norms, lm_head) and of the "
                  "compute: bf16 | f16 | f32");
  cmd->add_option("--double-quant", c->double_quant, "bnb's double quantisation of the absmax (true: 8-bit codes, as QLoRA)");
  cmd->add_option("--device", c->device, "auto | cpu | cuda | cuda:N: where the weights are quantised");
  cmd->add_option("--max-shard-size", c->max_shard_size, "at most this much per safetensors file (5GB, 500MB, ...)");
  cmd->add_flag("--overwrite", c->overwrite, "replace an existing output (only once the new one is complete)");
  cmd->callback([c] {
    const QuantizeResult r = run_quantize(*c);
    std::fprintf(stderr, "quantize: %lld linear layers in NF4; wrote %s:", static_cast<long long>(r.nf4_layers), c->output.c_str());
    for (const std::string& f : r.files) std::fprintf(stderr, " %s", f.c_str());
    std::fprintf(stderr, "\n");
  });
}

}  // namespace kiln::app

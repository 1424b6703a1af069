// Model and tokenizer loading shared by the subcommands: a HF folder or a named config with random
// weights, dtype/device resolution, the optional NF4 base, and a PEFT adapter on top.
#include <filesystem>

#include "core/cuda/runtime.h"
#include "data/default_corpus.h"
#include "examples/kiln/app.h"
#include "nn/nf4_linear.h"

namespace kiln::app {

namespace fs = std::filesystem;

void add_model_options(CLI::App& cmd, ModelSpec& spec, bool with_adapter) {
  auto* model = cmd.add_option("--model", spec.model_dir, "Hugging Face model folder (config.json + *.safetensors)");
  cmd.add_option("--config", spec.config, "named config (llama3.1-8b, llama3.1-70b, tiny) or config.json, with random weights")
      ->excludes(model);
  cmd.add_option("--seed", spec.seed, "seed of random weights and everything random");
  if (with_adapter) cmd.add_option("--adapter", spec.adapter, "PEFT LoRA adapter folder to load (a kiln_base.json in it, as kiln finetune writes, "
                                    "gives the base: --model/--config, --seed, --nf4 and --tokenizer default to it)");
  cmd.add_option("--dtype", spec.dtype, "auto | f32 | bf16 | f16 (auto: bf16 on GPU, f32 on CPU)");
  cmd.add_option("--device", spec.device, "auto | cpu | cuda | cuda:N");
  cmd.add_flag("--nf4", spec.nf4, "quantise the base linear layers to NF4 (QLoRA); --nf4 false: don't (default: as the "
               "adapter's kiln_base.json records, else false)")
      ->expected(0, 1);
}

Device resolve_device(const std::string& spec) {
  if (spec == "auto") return cuda::is_available() ? Device(DeviceType::cuda, 0) : kCPU;
  const Device d(spec);
  KILN_CHECK(!d.is_cuda() || d.index < cuda::device_count(), "kiln", "device {} asked for, {} CUDA device(s) present",
             d.str(), cuda::device_count());
  return d;
}

DType resolve_dtype(const std::string& spec, Device device) {
  if (spec == "auto") return device.is_cuda() ? DType::bf16 : DType::f32;
  if (spec == "f32" || spec == "float32") return DType::f32;
  if (spec == "bf16" || spec == "bfloat16") return DType::bf16;
  if (spec == "f16" || spec == "float16") return DType::f16;
  KILN_FAIL("kiln", "unknown dtype '{}' (auto, f32, bf16, f16)", spec);
}

std::shared_ptr<nn::Llama> load_model(const ModelSpec& spec) {
  nn::LlamaOptions o;
  o.device = resolve_device(spec.device);
  o.dtype = resolve_dtype(spec.dtype, o.device);
  o.seed = spec.seed;
  if (spec.nf4) o.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  std::shared_ptr<nn::Llama> model;
  if (!spec.model_dir.empty()) {
    model = nn::Llama::from_pretrained(spec.model_dir, o);
  } else {
    KILN_CHECK(!spec.config.empty(), "kiln", "give --model DIR or --config NAME");
    model = std::make_shared<nn::Llama>(nn::LlamaConfig::named(spec.config), o);
  }
  if (!spec.adapter.empty()) nn::load_adapter(*model, spec.adapter);
  return model;
}

data::Tokenizer load_tokenizer(const std::string& path, const std::string& model_dir) {
  auto file_in = [](const fs::path& p) { return fs::is_directory(p) ? p / "tokenizer.json" : p; };
  if (!path.empty()) return data::Tokenizer::from_file(file_in(path).string());
  if (!model_dir.empty() && fs::exists(fs::path(model_dir) / "tokenizer.json"))
    return data::Tokenizer::from_file((fs::path(model_dir) / "tokenizer.json").string());
  return data::Tokenizer::from_file(data::default_tokenizer_path());
}

}  // namespace kiln::app

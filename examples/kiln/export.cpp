// `kiln export`: merge a LoRA adapter into its (NF4, bnb-4bit or plain) base and write the result as a
// Hugging Face folder or a GGUF file, or write the adapter alone as a llama.cpp LoRA file. The output is
// built in a temporary folder (or file) next to it and renamed into place at the end, so an error leaves
// nothing behind.
#include "examples/kiln/export.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/file_io.h"
#include "data/default_corpus.h"
#include "examples/kiln/adapter_base.h"
#include "io/shard_writer.h"
#include "nn/llama_gguf.h"
#include "nn/lora.h"
#include "nn/merge.h"
#include "nn/nf4_linear.h"

namespace kiln::app {

namespace fs = std::filesystem;

namespace {

// The tokenizer.json the model's tokenizer comes from, chosen as load_tokenizer (model.cpp) chooses it.
fs::path tokenizer_json(const std::string& path, const std::string& model_dir) {
  if (!path.empty()) return fs::is_directory(path) ? fs::path(path) / "tokenizer.json" : fs::path(path);
  if (!model_dir.empty() && fs::exists(fs::path(model_dir) / "tokenizer.json")) return fs::path(model_dir) / "tokenizer.json";
  return data::default_tokenizer_path();
}

// A fresh folder next to `target` ("<target>.tmp-XXXXXX"), removed on destruction unless released.
struct TempFolder {
  fs::path path;
  explicit TempFolder(const fs::path& target) {
    std::string tmpl = target.string() + ".tmp-XXXXXX";
    KILN_CHECK(::mkdtemp(tmpl.data()) != nullptr, "export", "cannot create a folder next to {}: {}", target.string(),
               std::strerror(errno));
    path = tmpl;
    // mkdtemp makes it 0700; the result is an ordinary folder, so it gets the mode mkdir would give it
    const mode_t mask = ::umask(0);
    ::umask(mask);
    KILN_CHECK(::chmod(tmpl.c_str(), 0777 & ~mask) == 0, "export", "cannot set the mode of {}: {}", tmpl, std::strerror(errno));
  }
  ~TempFolder() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
  TempFolder(const TempFolder&) = delete;
  TempFolder& operator=(const TempFolder&) = delete;
};

void check_adapter(const std::string& dir) {
  KILN_CHECK(fs::is_directory(dir), "export", "adapter folder {} does not exist", dir);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    KILN_CHECK(fs::exists(fs::path(dir) / f), "export", "adapter folder {} has no {}", dir, f);
}

// config.json with the quantization_config transformers writes for a model loaded with
// BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...): what lets transformers, and kiln,
// load the NF4 tensors as they are. Double quantisation as the model's NF4 weights have it (all alike).
std::string with_bnb_quantization_config(const std::string& config_json, nn::Llama& model) {
  int double_quant = -1;  // unknown until the first NF4 layer
  for (auto& [path, m] : model.named_modules())
    if (const auto* nf4 = dynamic_cast<const nn::NF4Linear*>(m)) {
      const int dq = nf4->weight().double_quant ? 1 : 0;
      KILN_CHECK(double_quant < 0 || dq == double_quant, "export",
                 "{}: NF4 weights with and without double quantisation; a bnb-4bit config holds one setting", path);
      double_quant = dq;
    }
  KILN_CHECK(double_quant >= 0, "export", "the model has no NF4 layers to write as bnb-4bit");
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(config_json);
  j["quantization_config"] = {{"_load_in_4bit", true},
                              {"_load_in_8bit", false},
                              {"bnb_4bit_compute_dtype", j.at("torch_dtype")},  // the dtype written
                              {"bnb_4bit_quant_storage", "uint8"},
                              {"bnb_4bit_quant_type", "nf4"},
                              {"bnb_4bit_use_double_quant", double_quant == 1},
                              {"llm_int8_enable_fp32_cpu_offload", false},
                              {"llm_int8_has_fp16_weight", false},
                              {"llm_int8_skip_modules", nullptr},
                              {"llm_int8_threshold", 6.0},
                              {"load_in_4bit", true},
                              {"load_in_8bit", false},
                              {"quant_method", "bitsandbytes"}};
  return j.dump(2);
}

// Moves `from` over `to` (a folder or file), replacing what was there only once `from` is complete.
void move_into_place(const fs::path& from, const fs::path& to) {
  if (fs::exists(to)) {
    const fs::path old = to.string() + ".old";
    fs::remove_all(old);
    fs::rename(to, old);
    fs::rename(from, to);
    fs::remove_all(old);
  } else {
    fs::rename(from, to);
  }
}

}  // namespace

void check_output_path(const std::string& output, bool overwrite, bool file) {
  KILN_CHECK(!output.empty(), "export", "give --output");
  const fs::path out = fs::absolute(output);
  const fs::path parent = out.parent_path();
  KILN_CHECK(fs::is_directory(parent), "export", "{}: the folder to write into, {}, does not exist", output, parent.string());
  KILN_CHECK(::access(parent.c_str(), W_OK) == 0, "export", "{}: cannot write into {}: {}", output, parent.string(),
             std::strerror(errno));
  if (fs::exists(out)) {
    const bool empty_dir = fs::is_directory(out) && fs::is_empty(out);
    KILN_CHECK(overwrite || empty_dir, "export", "{} exists (give --overwrite to replace it)", output);
    KILN_CHECK(file || fs::is_directory(out), "export", "{} exists and is not a folder", output);
    KILN_CHECK(!file || !fs::is_directory(out) || empty_dir, "export", "{} is a folder; a file is written there", output);
  }
}

std::vector<std::string> save_hf_folder(nn::Llama& model, const std::string& output, DType dtype, const std::string& model_dir,
                                        const std::string& tokenizer, const std::string& max_shard_size, bool nf4_as_bnb) {
  const fs::path tok_json = tokenizer_json(tokenizer, model_dir);
  KILN_CHECK(fs::exists(tok_json), "export", "tokenizer {} does not exist", tok_json.string());
  const fs::path out = fs::absolute(output);
  TempFolder tmp(out);
  const fs::path& dir = tmp.path;
  io::ShardedSafetensorsWriter shards(dir.string(), io::parse_byte_size(max_shard_size), {{"format", "pt"}});
  for (const nn::PlainTensor& t : nn::plain_tensors(model, nf4_as_bnb)) shards.add(t.key, t.get(dtype));
  std::vector<std::string> files = shards.finish();
  if (files.size() > 1) files.push_back("model.safetensors.index.json");
  nn::LlamaConfig config = model.config();
  config.torch_dtype = dtype;
  std::string config_json = config.to_json();
  if (nf4_as_bnb) config_json = with_bnb_quantization_config(config_json, model);
  write_file_atomic((dir / "config.json").string(), config_json + "\n", "export");
  files.push_back("config.json");
  if (!model_dir.empty() && fs::exists(fs::path(model_dir) / "generation_config.json")) {
    fs::copy_file(fs::path(model_dir) / "generation_config.json", dir / "generation_config.json");
    files.push_back("generation_config.json");
  }
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
    const fs::path src = f == std::string("tokenizer.json") ? tok_json : tok_json.parent_path() / f;
    if (!fs::exists(src)) continue;
    fs::copy_file(src, dir / f);
    files.push_back(f);
  }
  move_into_place(tmp.path, out);
  tmp.path.clear();
  return files;
}

ExportResult run_export(const ExportCommand& c) {
  KILN_CHECK(c.format == "hf" || c.format == "gguf" || c.format == "gguf-lora", "export", "unknown --format '{}' (hf, gguf, gguf-lora)",
             c.format);
  KILN_CHECK(c.format != "gguf-lora" || !c.model.adapter.empty(), "export", "--format gguf-lora writes an adapter: give --adapter");
  const DType dtype = resolve_dtype(c.dtype, kCPU);
  KILN_CHECK(dtype != DType::f64, "export", "--dtype must be bf16, f16 or f32");
  const io::GGUFTensorType gguf_type = io::parse_gguf_type(c.gguf_type);
  io::parse_byte_size(c.max_shard_size);  // a bad size is an error before the model is built
  if (!c.model.adapter.empty()) check_adapter(c.model.adapter);
  check_output_path(c.output, c.overwrite, /*file=*/c.format != "hf");

  // The base and the adapter, as finetune/generate build them (load_adapter checks every shape first).
  std::shared_ptr<nn::Llama> model = load_model(c.model);
  ExportResult result;
  result.lora_layers = static_cast<int64_t>(nn::lora_layers(*model).size());
  const fs::path tok_json = tokenizer_json(c.tokenizer, c.model.model_dir);
  KILN_CHECK(fs::exists(tok_json), "export", "tokenizer {} does not exist", tok_json.string());

  const fs::path out = fs::absolute(c.output);
  if (c.format == "hf") {
    result.files = save_hf_folder(*model, c.output, dtype, c.model.model_dir, c.tokenizer, c.max_shard_size);
  } else {
    const std::string name = !c.model.model_dir.empty() ? fs::path(c.model.model_dir).filename().string()
                                                         : fs::path(c.model.config).stem().string();
    TempFolder tmp(out);
    const fs::path file = tmp.path / "model.gguf";
    const std::string adapter = fs::path(c.model.adapter).filename().string();
    if (c.format == "gguf-lora") {
      nn::write_llama_lora_gguf(file.string(), *model, gguf_type, adapter + " (LoRA of " + name + ")");
    } else {
      const nn::GGUFVocab vocab = nn::read_gguf_vocab(tok_json.parent_path().string(), model->config().vocab_size);
      nn::write_llama_gguf(file.string(), *model, vocab, gguf_type, adapter.empty() ? name : name + " + " + adapter);
    }
    if (fs::is_directory(out)) fs::remove(out);  // an empty folder (checked above)
    move_into_place(file, out);
    result.files.push_back(out.filename().string());
  }
  return result;
}

void add_export_command(CLI::App& app) {
  auto c = std::make_shared<ExportCommand>();
  CLI::App* cmd = app.add_subcommand("export", "merge a LoRA adapter into its base; write a Hugging Face folder or a GGUF file "
                                      "(or the adapter alone as a llama.cpp LoRA file)");
  auto* model = cmd->add_option("--model", c->model.model_dir, "the base: a Hugging Face folder (plain or bnb-4bit)");
  cmd->add_option("--config", c->model.config, "the base: a named config or config.json with random weights (--seed)")
      ->excludes(model);
  cmd->add_flag("--random-init", c->random_init, "the --config base has random weights (the only kind it has; accepted "
                "for clarity)")
      ->excludes(model);
  cmd->add_option("--seed", c->model.seed, "seed of the random base weights");
  cmd->add_flag("--nf4", c->model.nf4, "the base was quantised to NF4 when trained (QLoRA): merge into its dequantised weights")
      ->expected(0, 1);
  cmd->add_option("--adapter", c->model.adapter, "the PEFT LoRA adapter folder to merge (its kiln_base.json, as kiln "
                  "finetune writes, gives --model/--config, --seed, --nf4 and --tokenizer by default); without it the base "
                  "alone is written (a random base, or a bnb-4bit or --nf4 one dequantised)");
  cmd->add_option("--tokenizer", c->tokenizer, "tokenizer.json or its folder (default: the model's, else kiln's)");
  cmd->add_option("--output", c->output, "hf: the folder to create; gguf, gguf-lora: the .gguf file")->required();
  cmd->add_option("--dtype", c->dtype, "hf: dtype of the written tensors: bf16 | f16 | f32");
  cmd->add_option("--format", c->format, "hf (a Hugging Face folder) | gguf (one file for llama.cpp) | gguf-lora (the "
                  "--adapter alone, unmerged, as a llama.cpp LoRA file: llama-cli -m base.gguf --lora it.gguf, where base.gguf "
                  "is this command's --format gguf without --adapter, --nf4 as trained)");
  cmd->add_option("--gguf-type", c->gguf_type, "gguf, gguf-lora: f32 | f16 | bf16 | q8_0 for matrices (1-d tensors stay f32)");
  cmd->add_option("--max-shard-size", c->max_shard_size, "hf: at most this much per safetensors file (5GB, 500MB, ...)");
  cmd->add_option("--base-dtype", c->model.dtype, "dtype the base is built in, as kiln finetune's --dtype: auto | f32 | bf16 "
                  "(auto: bf16 on GPU, f32 on CPU); the merge itself is computed in f32");
  cmd->add_option("--device", c->model.device, "auto | cpu | cuda | cuda:N");
  cmd->add_flag("--overwrite", c->overwrite, "replace an existing output (only once the new one is complete)");
  cmd->callback([cmd, c] {
    for (const std::string& w : apply_adapter_base(c->model, &c->tokenizer, given_model_options(*cmd)))
      std::fprintf(stderr, "warning: %s\n", w.c_str());
    const ExportResult r = run_export(*c);
    std::fprintf(stderr, "export: %lld LoRA layers %s; wrote %s:", static_cast<long long>(r.lora_layers),
                 c->format == "gguf-lora" ? "written apart" : "merged", c->output.c_str());
    for (const std::string& f : r.files) std::fprintf(stderr, " %s", f.c_str());
    std::fprintf(stderr, "\n");
  });
}

}  // namespace kiln::app

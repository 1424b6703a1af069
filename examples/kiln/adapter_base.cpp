// kiln_base.json next to an adapter (see adapter_base.h): written by finetune, applied by generate/eval.
#include "examples/kiln/adapter_base.h"

#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/json_int.h"

namespace kiln::app {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFormat = "kiln-adapter-base-1";

// Paths compared as the files they name (a relative and an absolute spelling are the same base).
bool same_path(const std::string& a, const std::string& b) {
  std::error_code ea, eb;
  const fs::path pa = fs::weakly_canonical(a, ea), pb = fs::weakly_canonical(b, eb);
  return (ea || eb) ? a == b : pa == pb;
}

std::string describe(const AdapterBase& b) {
  return b.model_dir.empty() ? fmt::format("the random-weight config {} (seed {})", b.config, b.seed)
                             : fmt::format("the model {}", b.model_dir);
}

}  // namespace

void write_adapter_base(const std::string& adapter_dir, const AdapterBase& b) {
  const json j{{"format", kFormat},
               {"written_by", "kiln finetune: the base this adapter was trained on (kiln generate/eval --adapter read it)"},
               {"model", b.model_dir},
               {"config", b.config},
               {"seed", b.seed},
               {"nf4", b.nf4},
               {"tokenizer", b.tokenizer},
               {"dtype", b.dtype}};
  write_file_atomic((fs::path(adapter_dir) / kAdapterBaseFile).string(), j.dump(2) + "\n", "adapter");
}

std::optional<AdapterBase> read_adapter_base(const std::string& adapter_dir) {
  const fs::path path = fs::path(adapter_dir) / kAdapterBaseFile;
  if (!fs::exists(path)) return std::nullopt;
  const std::string text = read_file(path.string(), "adapter");
  AdapterBase b;
  try {
    const json j = json::parse(text);
    KILN_CHECK(j.is_object() && j.value("format", "") == kFormat, "adapter", "{}: expected format '{}', found {}",
               path.string(), kFormat, j.is_object() ? j.value("format", "(none)") : j.type_name());
    b.model_dir = j.at("model").get<std::string>();
    b.config = j.at("config").get<std::string>();
    b.seed = need_json_uint(j.at("seed"), "adapter", path.string() + ": seed");
    b.nf4 = j.at("nf4").get<bool>();
    b.tokenizer = j.value("tokenizer", "");
    b.dtype = j.value("dtype", "");
  } catch (const json::exception& e) {
    KILN_FAIL("adapter", "{}: malformed: {}", path.string(), e.what());
  }
  KILN_CHECK(!b.model_dir.empty() || !b.config.empty(), "adapter", "{}: names neither a model nor a config",
             path.string());
  return b;
}

GivenModelOptions given_model_options(const CLI::App& cmd) {
  auto given = [&](const char* name) {
    const CLI::Option* o = cmd.get_option_no_throw(name);
    return o != nullptr && o->count() > 0;
  };
  const bool dtype = cmd.get_option_no_throw("--base-dtype") != nullptr ? given("--base-dtype") : given("--dtype");
  return {given("--model"), given("--config"), given("--seed"), given("--nf4"), given("--tokenizer"), dtype};
}

std::vector<std::string> apply_adapter_base(ModelSpec& spec, std::string* tokenizer, const GivenModelOptions& given) {
  std::vector<std::string> warnings;
  if (spec.adapter.empty()) return warnings;
  const std::optional<AdapterBase> rec = read_adapter_base(spec.adapter);
  if (!rec) return warnings;
  const std::string where = fmt::format("the adapter in {} was trained on {}", spec.adapter, describe(*rec));
  if (!given.model && !given.config) {
    spec.model_dir = rec->model_dir;
    spec.config = rec->model_dir.empty() ? rec->config : "";
  } else if (given.model && (rec->model_dir.empty() || !same_path(spec.model_dir, rec->model_dir))) {
    warnings.push_back(fmt::format("{}, not on --model {}: its outputs will not be the trained ones", where, spec.model_dir));
  } else if (given.config && (!rec->model_dir.empty() || !(spec.config == rec->config || same_path(spec.config, rec->config)))) {
    warnings.push_back(fmt::format("{}, not on --config {}: its outputs will not be the trained ones", where, spec.config));
  }
  if (spec.model_dir.empty() && rec->model_dir.empty() && (spec.config == rec->config || same_path(spec.config, rec->config))) {
    if (given.seed && spec.seed != rec->seed)
      warnings.push_back(fmt::format("{}: its random base weights use the recorded seed {}; --seed {} seeds sampling only",
                                     where, rec->seed, spec.seed));
    spec.seed = rec->seed;
  }
  if (!given.nf4) spec.nf4 = rec->nf4;
  else if (spec.nf4 != rec->nf4)
    warnings.push_back(fmt::format("{} with {} base; --nf4 {} loads it {}: outputs will differ from the trained ones", where,
                                   rec->nf4 ? "an NF4 (QLoRA)" : "an unquantised", spec.nf4 ? "true" : "false",
                                   spec.nf4 ? "quantised to NF4" : "unquantised"));
  if (!rec->dtype.empty()) {
    if (!given.dtype) spec.dtype = rec->dtype;
    else if (spec.dtype != rec->dtype)
      warnings.push_back(fmt::format("{} built in {}; building it in {} changes its {}: outputs will differ from the "
                                     "trained ones", where, rec->dtype, spec.dtype,
                                     rec->nf4 ? "NF4 codes" : "weights' rounding"));
  }
  if (tokenizer != nullptr && !rec->tokenizer.empty()) {
    if (!given.tokenizer) *tokenizer = rec->tokenizer;
    else if (!same_path(*tokenizer, rec->tokenizer))
      warnings.push_back(fmt::format("the adapter in {} was trained with the tokenizer {}, not --tokenizer {}", spec.adapter,
                                     rec->tokenizer, *tokenizer));
  }
  return warnings;
}

}  // namespace kiln::app

// LoRA layers, wrapping a model's linear layers by name, merge/unmerge, and PEFT adapter folders.
#include "nn/lora.h"
#include "core/file_io.h"
#include "core/json_int.h"

#include <cctype>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "autograd/grad_mode.h"
#include "core/ops.h"
#include "io/safetensors.h"

namespace kiln::nn {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kPeftPrefix = "base_model.model.";

// The parent module and child name of a dotted path ("a.b.c" -> (a.b, c)).
std::pair<std::string, std::string> split_path(const std::string& path) {
  const size_t dot = path.rfind('.');
  if (dot == std::string::npos) return {"", path};
  return {path.substr(0, dot), path.substr(dot + 1)};
}

Module& module_at(Module& root, const std::string& path) { return path.empty() ? root : *root.find_module(path); }

// Paths of the LinearBase modules `config` targets (not the insides of LoRA layers).
std::vector<std::string> target_paths(Module& root, const LoraConfig& config) {
  std::vector<std::string> out;
  for (auto& [path, m] : root.named_modules()) {
    if (path.empty() || !dynamic_cast<LinearBase*>(m) || dynamic_cast<LoraLinear*>(m)) continue;
    if (path.find(".lora_A") != std::string::npos || path.find(".lora_B") != std::string::npos ||
        path.ends_with(".base_layer"))
      continue;
    if (config.matches(path)) out.push_back(path);
  }
  return out;
}

}  // namespace

// ---- config

double LoraConfig::scaling() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r); }

namespace {

// PEFT's target_modules regex, matched against a whole module path as Python's re.fullmatch does:
// PCRE2 (Perl syntax, close to Python's), compiled anchored at both ends and run by PCRE2's DFA matcher,
// whose time is linear in the path for a given pattern (no backtracking: "(a?){40}a{40}" is quick). A
// pattern that is malformed, compiles too large (nested repetitions such as "((q{9}){9}){9}" hit PCRE2's
// size limit at once) or uses back-references (the DFA has none; PEFT's patterns need none) is a
// kiln::Error naming it.
class TargetRegex {
 public:
  explicit TargetRegex(const std::string& pattern) : pattern_(pattern) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_ANCHORED | PCRE2_ENDANCHORED, &err, &offset, nullptr);
    KILN_CHECK(code_ != nullptr, "lora", "target_modules regex '{}' does not compile: {} (at offset {})", pattern,
               message(err), offset);
    uint32_t backrefs = 0;
    pcre2_pattern_info(code_, PCRE2_INFO_BACKREFMAX, &backrefs);
    if (backrefs > 0) {
      pcre2_code_free(code_);
      KILN_FAIL("lora", "target_modules regex '{}': back-references (\\1) are not supported", pattern);
    }
  }
  TargetRegex(const TargetRegex&) = delete;
  TargetRegex& operator=(const TargetRegex&) = delete;
  ~TargetRegex() { pcre2_code_free(code_); }

  bool full_match(const std::string& path) const {
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    KILN_CHECK(md != nullptr, "lora", "out of memory matching target_modules regex '{}'", pattern_);
    std::vector<int> workspace(4096);
    const int rc = pcre2_dfa_match(code_, reinterpret_cast<PCRE2_SPTR>(path.data()), path.size(), 0, 0, md, nullptr,
                                   workspace.data(), workspace.size());
    pcre2_match_data_free(md);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    KILN_CHECK(rc >= 0, "lora", "target_modules regex '{}' failed on '{}': {}", pattern_, path, message(rc));
    return true;
  }

 private:
  static std::string message(int code) {
    std::string msg(256, '\0');
    const int n = pcre2_get_error_message(code, reinterpret_cast<PCRE2_UCHAR*>(msg.data()), msg.size());
    msg.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return msg;
  }
  std::string pattern_;
  pcre2_code* code_ = nullptr;
};

}  // namespace

void LoraConfig::validate() const {
  KILN_CHECK(r > 0, "lora", "rank r must be positive, found {}", r);
  KILN_CHECK(dropout >= 0 && dropout < 1, "lora", "dropout must be in [0, 1), found {}", dropout);
  KILN_CHECK(!target_modules.empty() || !target_regex.empty(), "lora", "no target modules given");
  if (!target_regex.empty()) (void)TargetRegex(target_regex);
}

bool LoraConfig::matches(const std::string& path) const {
  if (!target_regex.empty()) return TargetRegex(target_regex).full_match(path);
  for (const std::string& t : target_modules)
    if (path == t || (path.size() > t.size() && path.ends_with(t) && path[path.size() - t.size() - 1] == '.')) return true;
  return false;
}

std::string LoraConfig::to_peft_json() const {
  json j{{"peft_type", "LORA"},
         {"task_type", "CAUSAL_LM"},
         {"base_model_name_or_path", base_model_name_or_path.empty() ? json(nullptr) : json(base_model_name_or_path)},
         {"r", r},
         {"lora_alpha", alpha},
         {"lora_dropout", dropout},
         {"use_rslora", use_rslora},
         {"use_dora", false},
         {"bias", "none"},
         {"fan_in_fan_out", false},
         {"inference_mode", true},
         {"init_lora_weights", true},
         {"modules_to_save", nullptr},
         {"layers_to_transform", nullptr},
         {"layers_pattern", nullptr},
         {"rank_pattern", json::object()},
         {"alpha_pattern", json::object()},
         {"revision", nullptr}};
  if (!target_regex.empty()) j["target_modules"] = target_regex;
  else j["target_modules"] = target_modules;
  return j.dump(2);
}

LoraConfig LoraConfig::from_peft_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    KILN_FAIL("adapter", "{}: invalid JSON: {}", source, e.what());
  }
  LoraConfig c;
  try {
    KILN_CHECK(j.is_object() && j.value("peft_type", std::string("LORA")) == "LORA", "adapter",
               "{}: expected a LORA adapter config, found peft_type {}", source, j.is_object() ? j.value("peft_type", std::string("?")) : "?");
    c.r = need_json_int(j.at("r"), "adapter", source + ": r");
    c.alpha = j.at("lora_alpha").get<double>();
    c.dropout = j.value("lora_dropout", 0.0);
    c.use_rslora = j.value("use_rslora", false);
    KILN_CHECK(!j.value("use_dora", false), "adapter", "{}: DoRA adapters are not supported", source);
    KILN_CHECK(j.value("bias", std::string("none")) == "none", "adapter", "{}: bias '{}' is not supported (none)", source,
               j.value("bias", std::string("")));
    KILN_CHECK(!j.value("fan_in_fan_out", false), "adapter", "{}: fan_in_fan_out adapters are not supported", source);
    for (const char* key : {"rank_pattern", "alpha_pattern"})
      KILN_CHECK(!j.contains(key) || j[key].is_null() || j[key].empty(), "adapter", "{}: per-module {} is not supported",
                 source, key);
    KILN_CHECK(!j.contains("modules_to_save") || j["modules_to_save"].is_null() || j["modules_to_save"].empty(), "adapter",
               "{}: modules_to_save is not supported", source);
    const json& t = j.at("target_modules");
    if (t.is_string()) c.target_regex = t.get<std::string>(), c.target_modules.clear();
    else c.target_modules = t.get<std::vector<std::string>>();
    if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
      c.base_model_name_or_path = j["base_model_name_or_path"];
  } catch (const json::exception& e) {
    KILN_FAIL("adapter", "{}: {}", source, e.what());
  }
  c.validate();
  return c;
}

// ---- the layer

LoraLinear::LoraLinear(std::shared_ptr<LinearBase> base, const LoraConfig& config, Generator* gen)
    : LinearBase(base ? base->in_features() : 0, base ? base->out_features() : 0),
      scaling_(config.scaling()),
      dropout_(config.dropout) {
  KILN_CHECK(base != nullptr, "lora", "LoraLinear needs a base layer");
  KILN_CHECK(!dynamic_cast<LoraLinear*>(base.get()), "lora", "the layer is already wrapped with LoRA");
  config.validate();
  const Device device = base->parameters().empty() ? base->named_buffers().at(0).second.device()
                                                   : base->parameters().front().device();
  base->requires_grad_(false);
  register_module("base_layer", std::move(base));
  Init a_init;  // peft: kaiming_uniform(a = sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
  a_init.gen = gen;
  register_module("lora_A", std::make_shared<Linear>(in_features_, config.r, false, DType::f32, device, a_init));
  register_module("lora_B", std::make_shared<Linear>(config.r, out_features_, false, DType::f32, device,
                                                     Init{Init::Kind::zeros, 0.0, nullptr}));
}

void LoraLinear::apply_to(std::optional<Device> device, std::optional<DType> dtype) {
  base().apply_to(device, dtype);
  child("lora_A")->apply_to(device, std::nullopt);
  child("lora_B")->apply_to(device, std::nullopt);
}

Tensor LoraLinear::lora_a() const { return child_as<Linear>("lora_A").weight(); }
Tensor LoraLinear::lora_b() const { return child_as<Linear>("lora_B").weight(); }

Tensor LoraLinear::forward(const Tensor& x) { return forward_add(x, Tensor()); }

Tensor LoraLinear::forward_add(const Tensor& x, const Tensor& residual) {
  // The base layer's GEMM (the residual in its epilogue) before the adapter's: backward runs the
  // adapter's then, so its memory-bound input-gradient GEMM writes dx and the base's compute-bound one
  // adds to it in its epilogue.
  const Tensor y = residual.defined() ? base().residual_add(residual, x) : base()(x);  // (..., out)
  if (merged_) return y;
  // Adapters live in f32 and compute in x's dtype.
  Tensor a = lora_a();
  if (a.dtype() != x.dtype()) a = cast(a, x.dtype());
  const Tensor xd = dropout_ > 0 ? dropout(x, dropout_, is_training()) : x;
  return add_up(matmul(xd, transpose(a, 0, 1)), y);  // u (..., r)
}

Tensor LoraLinear::add_up(const Tensor& u, const Tensor& y) const {
  // The GEMM applies the scaling (its alpha) and adds the base output (its addend): one pass over
  // (..., out), rounded once. (The other order, scaling * u @ B^T first as the base GEMM's addend, saves
  // that pass but slows the base GEMM more: measured on an H100, bench/RESULTS.md, seventeenth session.)
  Tensor b = lora_b();
  if (b.dtype() != u.dtype()) b = cast(b, u.dtype());
  return matmul_add(u, transpose(b, 0, 1), y, scaling_);  // (..., out)
}

std::vector<Tensor> shared_input_forward(const std::vector<LinearBase*>& layers, const Tensor& x) {
  KILN_CHECK(x.defined() && x.dim() >= 1, "lora", "shared_input_forward: x must be a defined tensor of at least 1 dim");
  for (size_t i = 0; i < layers.size(); ++i) {
    KILN_CHECK(layers[i] != nullptr, "lora", "shared_input_forward: layer {} is null", i);
    KILN_CHECK(layers[i]->in_features() == x.shape().back(), "lora",
               "shared_input_forward: layer {} ({}) takes {} inputs, x has {}", i, layers[i]->type_name(),
               layers[i]->in_features(), x.shape().back());
  }
  // A layer whose adapter runs as forward() would (unmerged, no hooks of its own, no dropout at work) and
  // matches the first one's rank, scaling and device.
  const auto shares = [](const LoraLinear* l, const LoraLinear* first) {
    if (!l || l->merged() || l->has_forward_hooks() || (l->dropout_rate() > 0 && l->is_training())) return false;
    return !first || (l->scaling() == first->scaling() && l->lora_a().size(0) == first->lora_a().size(0) &&
                      l->lora_a().device() == first->lora_a().device());
  };
  std::vector<LoraLinear*> lora;
  for (LinearBase* l : layers) {
    auto* a = dynamic_cast<LoraLinear*>(l);
    if (!shares(a, lora.empty() ? nullptr : lora[0])) break;
    lora.push_back(a);
  }
  std::vector<Tensor> out;
  if (layers.size() < 2 || lora.size() != layers.size()) {
    for (LinearBase* l : layers) out.push_back((*l)(x));
    return out;
  }
  std::vector<Tensor> as;
  for (LoraLinear* l : lora) as.push_back(l->lora_a());  // (r, in) each, f32
  const int64_t r = as[0].size(0);
  Tensor a = cat(as, 0);  // (n*r, in)
  if (a.dtype() != x.dtype()) a = cast(a, x.dtype());  // one cast of the stacked A
  const Tensor u = matmul(x, transpose(a, 0, 1));  // (..., n*r)
  for (size_t i = 0; i < lora.size(); ++i)  // u_i (..., r), rows n*r apart
    out.push_back(lora[i]->add_up(narrow(u, -1, static_cast<int64_t>(i) * r, r), lora[i]->base()(x)));
  return out;
}

void LoraLinear::add_delta(const Tensor& w, double sign) const {
  autograd::NoGradGuard no_grad;
  const DType acc = w.dtype() == DType::f64 ? DType::f64 : DType::f32;  // rounds once into w's dtype
  const Tensor delta = mul(matmul(cast(lora_b(), acc), cast(lora_a(), acc)), sign * scaling_);  // (out, in)
  copy_(w, add(cast(w, acc), delta));
}

void LoraLinear::merge() {
  KILN_CHECK(!merged_, "lora", "the adapter is already merged");
  auto* lin = dynamic_cast<Linear*>(&base());
  KILN_CHECK(lin != nullptr, "lora", "merge needs a Linear base, found {} (a quantised base cannot absorb the adapter)",
             base().type_name());
  add_delta(lin->weight(), 1.0);
  merged_ = true;
}

void LoraLinear::unmerge() {
  KILN_CHECK(merged_, "lora", "the adapter is not merged");
  add_delta(dynamic_cast<Linear&>(base()).weight(), -1.0);
  merged_ = false;
}

// ---- whole models

std::vector<std::string> apply_lora(Module& root, const LoraConfig& config, uint64_t seed) {
  config.validate();
  const std::vector<std::string> paths = target_paths(root, config);
  KILN_CHECK(!paths.empty(), "lora", "no linear layer matches the target modules");
  root.requires_grad_(false);
  Generator gen(seed);
  for (const std::string& path : paths) {
    auto [parent, name] = split_path(path);
    Module& p = module_at(root, parent);
    auto base = std::dynamic_pointer_cast<LinearBase>(p.child(name));
    p.replace_module(name, std::make_shared<LoraLinear>(base, config, &gen));
  }
  return paths;
}

std::vector<std::pair<std::string, LoraLinear*>> lora_layers(Module& root) {
  std::vector<std::pair<std::string, LoraLinear*>> out;
  for (auto& [path, m] : root.named_modules())
    if (auto* l = dynamic_cast<LoraLinear*>(m)) out.emplace_back(path, l);
  return out;
}

void merge_lora(Module& root) {
  for (auto& [path, l] : lora_layers(root)) l->merge();
}

void unmerge_lora(Module& root) {
  for (auto& [path, l] : lora_layers(root)) l->unmerge();
}

void save_adapter(Module& root, const LoraConfig& config, const std::string& dir) {
  const auto layers = lora_layers(root);
  KILN_CHECK(!layers.empty(), "adapter", "the model has no LoRA layers to save");
  fs::create_directories(dir);
  NamedTensors tensors;
  for (auto& [path, l] : layers) {
    tensors.emplace_back(kPeftPrefix + path + ".lora_A.weight", l->lora_a());
    tensors.emplace_back(kPeftPrefix + path + ".lora_B.weight", l->lora_b());
  }
  io::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "adapter_config.json").string(), config.to_peft_json(), "adapter");
}

LoraConfig read_adapter_config(const std::string& dir) {
  const fs::path p = fs::path(dir) / "adapter_config.json";
  return LoraConfig::from_peft_json(read_file(p.string(), "adapter"), p.string());
}

LoraConfig load_adapter(Module& root, const std::string& dir) {
  const LoraConfig config = read_adapter_config(dir);
  const io::SafetensorsFile file = io::SafetensorsFile::open((fs::path(dir) / "adapter_model.safetensors").string());
  // Which modules the file names, and the shapes they must have.
  std::set<std::string> paths;
  for (auto& [path, l] : lora_layers(root)) paths.insert(path);
  for (const std::string& p : target_paths(root, config)) paths.insert(p);
  KILN_CHECK(!paths.empty(), "adapter", "{}: no module of the model matches target_modules", dir);
  std::set<std::string> expected;
  for (const std::string& path : paths) {
    auto& lin = dynamic_cast<LinearBase&>(module_at(root, path));
    for (const char* which : {"lora_A", "lora_B"}) {
      const std::string key = kPeftPrefix + path + "." + which + ".weight";
      KILN_CHECK(file.contains(key), "adapter", "{}: missing tensor '{}'", file.path(), key);
      const Shape want = std::string(which) == "lora_A" ? Shape{config.r, lin.in_features()} : Shape{lin.out_features(), config.r};
      KILN_CHECK(file.info(key).shape == want, "adapter", "{}: tensor '{}' has shape {}, expected {}", file.path(), key,
                 shape_str(file.info(key).shape), shape_str(want));
      KILN_CHECK(is_floating(file.info(key).dtype), "adapter", "{}: tensor '{}' must be floating, found {}", file.path(),
                 key, dtype_name(file.info(key).dtype));
      expected.insert(key);
    }
  }
  for (const std::string& key : file.keys())
    KILN_CHECK(expected.count(key), "adapter", "{}: unexpected tensor '{}' (no such LoRA module in the model)", file.path(), key);
  // Everything checked: wrap what is not wrapped yet, then copy.
  std::vector<std::string> to_wrap;
  for (const std::string& p : target_paths(root, config)) to_wrap.push_back(p);
  if (!to_wrap.empty()) {
    root.requires_grad_(false);
    for (const std::string& path : to_wrap) {
      auto [parent, name] = split_path(path);
      Module& p = module_at(root, parent);
      p.replace_module(name, std::make_shared<LoraLinear>(std::dynamic_pointer_cast<LinearBase>(p.child(name)), config));
    }
  }
  autograd::NoGradGuard no_grad;
  for (auto& [path, l] : lora_layers(root)) {
    if (!paths.count(path)) continue;
    copy_(l->lora_a(), file.get(kPeftPrefix + path + ".lora_A.weight"));
    copy_(l->lora_b(), file.get(kPeftPrefix + path + ".lora_B.weight"));
  }
  return config;
}

}  // namespace kiln::nn

// Parity with Hugging Face transformers + peft (fixtures by tools/make_llama_fixtures.py in
// tests/data/llama/<case>/): base and adapter logits, the causal-LM loss, every LoRA gradient and
// five AdamW steps — f32 on the CPU (relative error <= 1e-4) and bf16 on the GPU (<= 2e-2).
#include <catch2/catch_test_macros.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/cuda/runtime.h"
#include "nn/llama.h"
#include "nn/lora.h"
#include "nn/optim.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

const char* kCases[] = {"gqa1_hd64_tied_llama3rope", "gqa4_hd128_untied_rslora", "gqa8_hd64_untied_norope",
                        "gqa2_hd64_tied_norope"};

fs::path case_dir(const std::string& name) { return test::test_data("llama/" + name); }

// max |a - b| / max |b| over the whole tensor (compared in f64 on the CPU).
double relative_error(const Tensor& a, const Tensor& b) {
  REQUIRE(a.shape() == b.shape());
  const auto av = cast(to_device(a, kCPU), DType::f64).to_vector<double>();
  const auto bv = cast(to_device(b, kCPU), DType::f64).to_vector<double>();
  double diff = 0, scale = 0;
  for (size_t i = 0; i < av.size(); ++i) {
    diff = std::max(diff, std::abs(av[i] - bv[i]));
    scale = std::max(scale, std::abs(bv[i]));
  }
  return diff / std::max(scale, 1e-30);
}

// HF's causal-LM loss: the logits at t predict labels[t + 1].
Tensor hf_loss(nn::Llama& m, const Tensor& ids, const Tensor& labels) {
  const int64_t t = ids.size(1);
  Tensor h = m.forward(ids);  // (B, T, hidden)
  return m.loss(narrow(h, 1, 0, t - 1), narrow(labels, 1, 1, t - 1));
}

void check_case(const std::string& name, Device device, DType dtype, double tol_logits, double tol_grad, double tol_loss) {
  INFO("case " << name << " on " << device.str() << " in " << dtype_name(dtype));
  const fs::path dir = case_dir(name);
  const io::SafetensorsFile ref = io::SafetensorsFile::open((dir / "reference.safetensors").string());
  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "meta.json"));
  nn::LlamaOptions o;
  o.dtype = dtype;
  o.device = device;
  auto model = nn::Llama::from_pretrained(dir.string(), o);
  model->eval();
  const Tensor ids = to_device(ref.get("input_ids"), device);
  const Tensor labels = to_device(ref.get("labels"), device);
  {
    autograd::NoGradGuard g;
    const double e = relative_error(model->logits(model->forward(ids)), ref.get("logits_base"));
    INFO("base logits relative error " << e);
    REQUIRE(e <= tol_logits);
  }
  nn::load_adapter(*model, (dir / "adapter").string());
  {
    autograd::NoGradGuard g;
    const double e = relative_error(model->logits(model->forward(ids)), ref.get("logits"));
    INFO("adapter logits relative error " << e);
    REQUIRE(e <= tol_logits);
  }
  // loss and every LoRA gradient
  model->train();
  Tensor loss = hf_loss(*model, ids, labels);
  const double want_loss = ref.get("loss").item<double>();
  INFO("loss " << loss.item<double>() << " vs " << want_loss);
  REQUIRE(std::abs(loss.item<double>() - want_loss) <= tol_loss * std::abs(want_loss));
  loss.backward();
  int checked = 0;
  for (auto& [path, layer] : nn::lora_layers(*model)) {
    for (auto [which, t] : {std::pair{"lora_A", layer->lora_a()}, std::pair{"lora_B", layer->lora_b()}}) {
      const std::string key = "grad.base_model.model." + path + "." + which + ".weight";
      REQUIRE(t.grad().defined());
      const double e = relative_error(t.grad(), ref.get(key));
      INFO(key << " relative error " << e);
      REQUIRE(e <= tol_grad);
      ++checked;
    }
  }
  REQUIRE(checked == static_cast<int>(ref.keys().size()) - 6);  // all grad.* keys
  // Five AdamW steps over the adapters on the same batch: the loss before each step.
  model->zero_grad();
  const auto& a = meta["adamw"];
  nn::AdamWOptions ao;
  ao.lr = a["lr"];
  ao.beta1 = a["beta1"];
  ao.beta2 = a["beta2"];
  ao.eps = a["eps"];
  ao.weight_decay = a["weight_decay"];
  nn::AdamW opt(model->named_trainable_parameters(), ao);
  const auto want = ref.get("adamw_losses").to_vector<float>();
  for (size_t s = 0; s < want.size(); ++s) {
    Tensor l = hf_loss(*model, ids, labels);
    INFO("AdamW step " << s << ": loss " << l.item<double>() << " vs " << want[s]);
    REQUIRE(std::abs(l.item<double>() - want[s]) <= tol_loss * std::abs(want[s]));
    l.backward();
    opt.step();
    opt.zero_grad();
  }
  // The trained adapter and its logits, for tools/peft_roundtrip.py (peft must load kiln's adapter
  // and compute the same logits): $TMPDIR/kiln_peft_roundtrip/<case>-<device>/.
  const fs::path out = fs::temp_directory_path() / "kiln_peft_roundtrip" / (name + "-" + (device.is_cuda() ? "cuda" : "cpu"));
  fs::remove_all(out);
  fs::create_directories(out);
  nn::save_adapter(*model, nn::read_adapter_config((dir / "adapter").string()), (out / "adapter").string());
  autograd::NoGradGuard g;
  model->eval();
  io::save_safetensors((out / "logits.safetensors").string(),
                       {{"input_ids", ref.get("input_ids")}, {"logits", cast(model->logits(model->forward(ids)), DType::f32)}});
}

}  // namespace

TEST_CASE("parity: Llama + LoRA against transformers/peft in f32 on the CPU", "[parity]") {
  for (const char* name : kCases) check_case(name, kCPU, DType::f32, 1e-4, 1e-4, 1e-5);
}

TEST_CASE("parity: Llama + LoRA against transformers/peft in bf16 on the GPU", "[parity][cuda]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (const char* name : kCases) check_case(name, Device(DeviceType::cuda, 0), DType::bf16, 2e-2, 1e-1, 2e-2);
}

TEST_CASE("parity: a kiln adapter saved and reloaded gives peft's logits", "[parity]") {
  const std::string name = kCases[1];
  const fs::path dir = case_dir(name);
  auto model = nn::Llama::from_pretrained(dir.string());
  const nn::LoraConfig cfg = nn::load_adapter(*model, (dir / "adapter").string());
  const fs::path out = fs::temp_directory_path() / "kiln_parity_adapter";
  fs::remove_all(out);
  nn::save_adapter(*model, cfg, out.string());
  auto again = nn::Llama::from_pretrained(dir.string());
  nn::load_adapter(*again, out.string());
  const io::SafetensorsFile ref = io::SafetensorsFile::open((dir / "reference.safetensors").string());
  autograd::NoGradGuard g;
  REQUIRE(relative_error(again->logits(again->forward(ref.get("input_ids"))), ref.get("logits")) <= 1e-4);
  fs::remove_all(out);
}

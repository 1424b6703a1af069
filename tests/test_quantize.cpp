// `kiln quantize` against what transformers + bitsandbytes wrote for the same weights (tests/data/nf4/
// tiny_llama_bnb4, made by tools/make_nf4_fixtures.py): the same tensors under the same keys, the same
// quant_state JSON and quantization_config, NF4 bytes equal to bnb's except where a weight lies on a level
// midpoint (bnb's CUDA reciprocal), and the folder loading with the logits of quantise-while-loading.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/grad_mode.h"
#include "core/file_io.h"
#include "examples/kiln/quantize.h"
#include "io/safetensors.h"
#include "nn/nf4_linear.h"
#include "quant/bnb_checkpoint.h"
#include "tests/helpers.h"
#include "tests/nf4_fixtures.h"

namespace fs = std::filesystem;
using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

using test::nf4::require_bytes_equal;
const std::string kState = ".quant_state.bitsandbytes__nf4";

nlohmann::json read_json(const fs::path& p) { return nlohmann::json::parse(read_file(p.string(), "test")); }
// The text a u8 tensor holds (a quant_state entry).
std::string text_of(const Tensor& t) {
  const std::vector<uint8_t> v = t.to_vector<uint8_t>();
  return std::string(v.begin(), v.end());
}

// The bf16 model the fixture was quantised from: its linear weights' originals, its other tensors as stored.
fs::path write_bf16_source(const fs::path& root) {
  const fs::path fx = test::nf4::fixtures();
  const io::SafetensorsFile bnb = io::SafetensorsFile::open((fx / "tiny_llama_bnb4" / "model.safetensors").string());
  const io::SafetensorsFile ref = io::SafetensorsFile::open((fx / "tiny_llama_reference.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& key : bnb.keys()) {
    if (quant::is_bnb_nf4(bnb, key)) tensors.emplace_back(key, ref.get(key + ".original"));
    else if (bnb.info(key).dtype == DType::bf16) tensors.emplace_back(key, bnb.get(key));  // embeddings, norms, lm_head
  }
  const fs::path src = root / "bf16";
  fs::create_directories(src);
  io::save_safetensors((src / "model.safetensors").string(), tensors);
  nlohmann::json config = read_json(fx / "tiny_llama_bnb4" / "config.json");
  config.erase("quantization_config");
  write_file_atomic((src / "config.json").string(), config.dump(2), "test");
  return src;
}

Tensor logits(nn::Llama& model) {
  autograd::NoGradGuard no_grad;
  const Tensor ids = from_vector<int64_t>({5, 17, 90, 3, 41, 64, 2, 77}, {2, 4});
  return model.logits(model(ids));  // (2, 4, 96)
}

}  // namespace

TEST_CASE("quantize: a bf16 folder becomes the bnb-4bit folder transformers writes, loading with the same logits", "[quantize]") {
  const fs::path root = test::scratch_dir("quantize", "bnb");
  const fs::path fx = test::nf4::fixtures() / "tiny_llama_bnb4";
  const fs::path src = write_bf16_source(root);
  app::QuantizeCommand c;
  c.model_dir = src.string();
  c.output = (root / "nf4").string();
  c.device = "cpu";
  const app::QuantizeResult r = app::run_quantize(c);
  CHECK(r.nf4_layers == 14);  // 2 layers x (q, k, v, o, gate, up, down)

  const io::SafetensorsFile want = io::SafetensorsFile::open((fx / "model.safetensors").string());
  const io::SafetensorsFile got = io::SafetensorsFile::open((root / "nf4" / "model.safetensors").string());
  const io::SafetensorsFile ref = io::SafetensorsFile::open((test::nf4::fixtures() / "tiny_llama_reference.safetensors").string());
  REQUIRE(got.keys() == want.keys());
  int nf4 = 0;
  for (const std::string& key : want.keys()) {
    INFO("tensor " << key);
    CHECK(got.info(key).shape == want.info(key).shape);
    if (quant::is_bnb_nf4(want, key)) {  // bnb's codes, up to its CUDA rounding at level and code midpoints
      ++nf4;
      const Tensor original = ref.get(key + ".original");
      const quant::NF4Weight single = quant::quantize_nf4(original, false);
      const quant::NF4Weight q = quant::read_bnb_nf4(want, key);
      test::nf4::require_packed_match(original, single.absmax, got.get(key), want.get(key));
      test::nf4::require_codes_match(single.absmax, q.offset, q.nested_absmax, got.get(key + ".absmax"), want.get(key + ".absmax"),
                                     q.nested_code);
      continue;
    }
    if (key.ends_with(".absmax")) continue;  // compared with its weight above
    if (key.ends_with(".nested_absmax")) {      // kiln's f32 mean of the absmax may differ from bnb's in the last bit
      test::require_close(got.get(key), want.get(key), 2e-6, 0);
    } else if (key.ends_with(kState)) {         // the same JSON but for that mean, "nested_offset"
      nlohmann::json a = nlohmann::json::parse(text_of(got.get(key))), b = nlohmann::json::parse(text_of(want.get(key)));
      const double ours = a["nested_offset"].get<double>(), bnb = b["nested_offset"].get<double>();
      CHECK(std::fabs(ours - bnb) <= 2e-6 * std::fabs(bnb));
      a.erase("nested_offset");
      b.erase("nested_offset");
      CHECK(a == b);
    } else {
      require_bytes_equal(got.get(key), want.get(key));  // quant_map, nested_quant_map, and every unquantised tensor
    }
  }
  CHECK(nf4 == 14);
  CHECK(read_json(root / "nf4" / "config.json").at("quantization_config") == read_json(fx / "config.json").at("quantization_config"));

  // kiln loads the folder as its NF4 weights, bit for bit those quantise-while-loading makes from the bf16 folder
  nn::LlamaOptions o;  // f32 compute
  auto loaded = nn::Llama::from_pretrained((root / "nf4").string(), o);
  nn::LlamaOptions q = o;
  q.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer); };
  auto quantised = nn::Llama::from_pretrained(src.string(), q);
  require_bytes_equal(logits(*loaded), logits(*quantised));

  // without double quantisation: f32 absmax, no nested tensors, and the config says so
  c.output = (root / "nf4_single").string();
  c.double_quant = false;
  app::run_quantize(c);
  const io::SafetensorsFile single = io::SafetensorsFile::open((root / "nf4_single" / "model.safetensors").string());
  const std::string w = "model.layers.1.mlp.down_proj.weight";
  CHECK(single.info(w + ".absmax").dtype == DType::f32);
  CHECK_FALSE(single.contains(w + ".nested_absmax"));
  CHECK(read_json(root / "nf4_single" / "config.json")["quantization_config"]["bnb_4bit_use_double_quant"] == false);
  q.on_layer_built = [](const std::string&, nn::LlamaDecoderLayer& layer) { nn::quantize_linears_nf4(layer, false); };
  require_bytes_equal(logits(*nn::Llama::from_pretrained((root / "nf4_single").string(), o)),
                      logits(*nn::Llama::from_pretrained(src.string(), q)));

  // a bnb-4bit folder (transformers') is written again as it is
  c.model_dir = fx.string();
  c.output = (root / "again").string();
  c.double_quant = true;
  CHECK(app::run_quantize(c).nf4_layers == 14);
  const io::SafetensorsFile again = io::SafetensorsFile::open((root / "again" / "model.safetensors").string());
  REQUIRE(again.keys() == want.keys());
  for (const std::string& key : want.keys()) {
    INFO("tensor " << key);
    require_bytes_equal(again.get(key), want.get(key));
  }
  fs::remove_all(root);
}

TEST_CASE("quantize: bad input is a clear error and writes nothing", "[quantize]") {
  const fs::path root = test::scratch_dir("quantize", "bad");
  const fs::path src = write_bf16_source(root);
  app::QuantizeCommand c;
  c.model_dir = src.string();
  c.device = "cpu";
  c.output = (root / "out").string();
  SECTION("no model folder") {
    c.model_dir = (root / "nope").string();
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("[quantize]") && ContainsSubstring("no config.json"));
  }
  SECTION("an output that exists, or whose folder does not") {
    fs::create_directories(root / "out");
    std::ofstream(root / "out" / "keep.txt") << "mine";
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("--overwrite"));
    CHECK(read_file((root / "out" / "keep.txt").string(), "test") == "mine");
    c.output = (root / "missing" / "out").string();
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("does not exist"));
  }
  SECTION("a bad dtype or shard size") {
    c.dtype = "f64";
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("unknown dtype 'f64'"));
    c.dtype = "bf16";
    c.max_shard_size = "3 parsecs";
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("parsecs"));
  }
  SECTION("a checkpoint missing a weight") {
    io::save_safetensors((src / "model.safetensors").string(), {{"model.norm.weight", ones({64}, DType::bf16)}});
    CHECK_THROWS_WITH(app::run_quantize(c), ContainsSubstring("model.embed_tokens.weight"));
  }
  CHECK_FALSE(fs::exists(root / "missing"));
  for (const auto& e : fs::directory_iterator(root)) CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
  fs::remove_all(root);
}

// The bad inputs a new user hit (issue 16), through the `kiln` commands' library halves: refused starts
// leave the run folder as it was, a finished run extends with more --steps, an impossible --batch-size
// and an unwritable --output are clear errors before anything is allocated, --eval-batches 0 and
// unscoreable eval files are refused, lengths past max_position_embeddings warn, the adapter folder
// records its base for generate, and boolean flags take `false` as a separate word.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "data/utf8.h"
#include "examples/kiln/adapter_base.h"
#include "examples/kiln/eval.h"
#include "examples/kiln/finetune.h"
#include "examples/kiln/generate.h"
#include "examples/kiln/memory_check.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

// A 2-layer Llama over the default tokenizer's 4,096 ids, a small corpus, 2 steps.
app::FinetuneConfig small_run(const fs::path& root, const std::string& output, int64_t max_positions = 2048) {
  const fs::path text = root / "corpus.txt";
  if (!fs::exists(text)) {
    std::ofstream out(text);
    for (int d = 0; d < 10; ++d)
      out << "And God said, Let there be light: and there was light. Verse " << d << " of the beginning.\n\n";
  }
  const fs::path config = root / fmt::format("config_{}.json", max_positions);
  std::ofstream(config) << fmt::format(R"({{"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": {}, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
    "bos_token_id": 3840, "eos_token_id": 3841}})", max_positions);
  app::FinetuneConfig c;
  c.config = config.string();
  c.random_init = true;
  c.data = text.string();
  c.text_split = "blank_lines";
  c.eval_fraction = 0.2;
  c.seq_len = 16;
  c.batch_size = 2;
  c.steps = 2;
  c.lora_r = 4;
  c.warmup = 1;
  c.eval_every = 2;
  c.eval_batches = 1;
  c.save_every = 0;
  c.sample_tokens = 6;
  c.seed = 3;
  c.device = "cpu";
  c.output = (root / output).string();
  return c;
}

app::FinetuneResult run(const app::FinetuneConfig& c) {
  app::FinetuneJob job(c);
  return job.run();
}

}  // namespace

TEST_CASE("finetune: a refused start leaves the run folder's config.toml as it was", "[finetune][cli]") {
  const fs::path root = test::scratch_dir("cli", "refused");
  const app::FinetuneConfig c = small_run(root, "run");
  run(c);
  const fs::path settings = fs::path(c.output) / "config.toml";
  const std::string before = test::read_file(settings);
  REQUIRE_THAT(before, ContainsSubstring("lora_r = 4"));

  app::FinetuneConfig other = c;
  other.resume = true;
  other.lora_r = 8;  // refused: the checkpoint has r = 4
  REQUIRE_THROWS_WITH(run(other), ContainsSubstring("lora_r: checkpoint '4', now '8'"));
  CHECK(test::read_file(settings) == before);
  other = c;
  other.resume = true;  // refused: the run already reached its 2 steps
  REQUIRE_THROWS_WITH(run(other), ContainsSubstring("[finetune]") && ContainsSubstring("nothing to train") &&
                                      ContainsSubstring("--steps > 2"));
  CHECK(test::read_file(settings) == before);
  other = c;
  other.data = (root / "weights.bin").string();  // a new start over the run that fails on its data
  std::ofstream(other.data, std::ios::binary) << std::string("\x00\x01\x02\x03", 4);
  REQUIRE_THROWS_WITH(run(other), ContainsSubstring("not UTF-8 text"));
  CHECK(test::read_file(settings) == before);
  fs::remove_all(root);
}

TEST_CASE("finetune: --resume with more --steps extends a finished run", "[finetune][cli]") {
  const fs::path root = test::scratch_dir("cli", "extend");
  app::FinetuneConfig c = small_run(root, "run");
  const app::FinetuneResult first = run(c);
  REQUIRE(first.last_step == 2);
  c.resume = true;
  c.steps = 4;
  app::FinetuneJob job(c);
  REQUIRE(job.resumed_from().has_value());
  REQUIRE(job.notes().size() == 1);
  CHECK_THAT(job.notes()[0], ContainsSubstring("extending the run to 4 steps"));
  const app::FinetuneResult second = job.run();
  CHECK(second.first_step == 2);
  CHECK(second.last_step == 4);
  CHECK(second.losses.size() == 2);
  CHECK(fs::exists(fs::path(c.output) / "checkpoint-4" / "adapter" / "adapter_model.safetensors"));
  CHECK_THAT(test::read_file(fs::path(c.output) / "config.toml"), ContainsSubstring("steps = 4"));

  // a checkpoint from before --steps left the fingerprint ("steps=4;epochs=0;" in it) still resumes
  const fs::path state = fs::path(c.output) / "checkpoint-4" / "trainer_state.json";
  auto j = nlohmann::json::parse(test::read_file(state));
  std::string fingerprint = j.at("fingerprint");
  REQUIRE(fingerprint.find(";steps=") == std::string::npos);
  fingerprint.insert(fingerprint.find(";lr="), ";steps=4;epochs=0");
  j["fingerprint"] = fingerprint;
  std::ofstream(state) << j.dump();
  c.steps = 5;
  const app::FinetuneResult third = run(c);
  CHECK(third.first_step == 4);
  CHECK(third.last_step == 5);
  c.lora_r = 8;  // and a real difference is still named
  REQUIRE_THROWS_WITH(run(c), ContainsSubstring("lora_r: checkpoint '4', now '8'"));
  fs::remove_all(root);
}

TEST_CASE("finetune: a --batch-size the machine's memory cannot hold is an error before allocating", "[finetune][cli]") {
  const fs::path root = test::scratch_dir("cli", "memory");
  app::FinetuneConfig c = small_run(root, "run");
  const nn::LlamaConfig mc = nn::LlamaConfig::named(c.config);
  const app::StepMemory small = app::estimate_step_memory(mc, c, DType::f32);
  c.batch_size *= 10;
  const app::StepMemory larger = app::estimate_step_memory(mc, c, DType::f32);
  CHECK(larger.weights == small.weights);
  CHECK(larger.activations > 9 * small.activations);
  c.checkpointing = true;
  CHECK(app::estimate_step_memory(mc, c, DType::f32).activations < larger.activations);
  REQUIRE_NOTHROW(app::check_step_fits(mc, c, DType::f32, 1e12));
  REQUIRE_THROWS_WITH(app::check_step_fits(mc, c, DType::f32, 1e3),
                      ContainsSubstring("[finetune] one training step needs about") &&
                          ContainsSubstring("--batch-size 20 x --seq-len 16") && ContainsSubstring("MemAvailable") &&
                          ContainsSubstring("lower --batch-size"));
  REQUIRE(app::available_host_memory().has_value());  // Linux

  app::FinetuneConfig huge = small_run(root, "huge");
  huge.batch_size = 100000;
  huge.seq_len = 4096;
  REQUIRE_THROWS_WITH(run(huge), ContainsSubstring("[finetune] one training step needs about") &&
                                     ContainsSubstring("MemAvailable"));
  CHECK_FALSE(fs::exists(fs::path(huge.output) / "config.toml"));  // nothing written
  fs::remove_all(root);
}

TEST_CASE("finetune: unwritable --output, --eval-batches 0 and long sequences", "[finetune][cli]") {
  const fs::path root = test::scratch_dir("cli", "output");
  app::FinetuneConfig c = small_run(root, "run");
  c.output = "/proc/kiln";
  REQUIRE_THROWS_WITH(run(c), ContainsSubstring("[finetune]") && ContainsSubstring("\"/proc/kiln\"") &&
                                  ContainsSubstring("--output"));
  std::ofstream(root / "a_file") << "x";
  c.output = (root / "a_file").string();
  REQUIRE_THROWS_WITH(run(c), ContainsSubstring("[finetune]") && ContainsSubstring("a_file"));

  c = small_run(root, "run");
  c.eval_batches = 0;
  REQUIRE_THROWS_WITH(c.validate(), ContainsSubstring("--eval-batches must be >= 1") && ContainsSubstring("--eval-every 0"));

  app::FinetuneConfig longer = small_run(root, "long", /*max_positions=*/8);
  app::FinetuneJob job(longer);
  REQUIRE(job.notes().size() == 1);
  CHECK_THAT(job.notes()[0], ContainsSubstring("--seq-len 16") && ContainsSubstring("max_position_embeddings of 8"));
  fs::remove_all(root);
}

TEST_CASE("finetune: the adapter records its base; generate --adapter loads it and reproduces the sample",
          "[finetune][generate][cli]") {
  const fs::path root = test::scratch_dir("cli", "adapter");
  app::FinetuneConfig c = small_run(root, "run");
  c.save_every = 1;
  const app::FinetuneResult r = run(c);
  REQUIRE(data::find_invalid_utf8(test::read_file(fs::path(c.output) / "sample.txt")) == std::string::npos);
  CHECK(test::read_file(fs::path(c.output) / "sample.txt").find("<|") == std::string::npos);
  const fs::path adapter = fs::path(c.output) / "adapter";
  const auto record = nlohmann::json::parse(test::read_file(adapter / "kiln_base.json"));
  CHECK(record.at("config") == fs::absolute(c.config).lexically_normal().string());
  CHECK(record.at("model") == "");
  CHECK(record.at("seed") == 3);
  CHECK(record.at("nf4") == true);
  CHECK(record.at("dtype") == "f32");  // what the base was built in (auto on the CPU): NF4 codes depend on it
  CHECK(fs::exists(fs::path(c.output) / "checkpoint-1" / "adapter" / "kiln_base.json"));

  // `kiln generate --adapter DIR --prompt P` with nothing else: the recorded base
  app::GenerateCommand g;
  g.model.adapter = adapter.string();
  g.model.device = "cpu";
  REQUIRE(app::apply_adapter_base(g.model, &g.tokenizer, {}).empty());
  CHECK(g.model.config == record.at("config"));
  CHECK(g.model.seed == 3);
  CHECK(g.model.nf4);
  CHECK(g.model.dtype == "f32");
  g.prompt = c.sample_prompt;
  g.options.max_new_tokens = c.sample_tokens;
  g.options.temperature = 0.7;
  g.options.top_p = 0.9;
  g.options.seed = c.seed;
  auto model = app::load_model(g.model);
  std::ostringstream out;
  const app::GenerateResult gen = app::run_generate(*model, app::load_tokenizer("", ""), g, out);
  CHECK(c.sample_prompt + gen.text == r.sample);  // the same base and adapter as at the end of training

  // what the user says wins, with a warning where it disagrees with the record
  app::ModelSpec spec;
  spec.adapter = adapter.string();
  spec.nf4 = false;
  auto warnings = app::apply_adapter_base(spec, nullptr, {.nf4 = true});
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], ContainsSubstring("NF4") && ContainsSubstring("--nf4 false"));
  CHECK_FALSE(spec.nf4);
  spec = {};
  spec.adapter = adapter.string();
  spec.seed = 9;
  warnings = app::apply_adapter_base(spec, nullptr, {.seed = true});
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], ContainsSubstring("recorded seed 3") && ContainsSubstring("--seed 9 seeds sampling only"));
  CHECK(spec.seed == 3);
  spec = {};
  spec.adapter = adapter.string();
  spec.config = "tiny";
  warnings = app::apply_adapter_base(spec, nullptr, {.config = true});
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], ContainsSubstring("not on --config tiny"));
  CHECK(spec.config == "tiny");
  spec = {};
  spec.adapter = adapter.string();
  spec.dtype = "bf16";
  warnings = app::apply_adapter_base(spec, nullptr, {.dtype = true});
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], ContainsSubstring("built in f32") && ContainsSubstring("NF4 codes"));
  CHECK(spec.dtype == "bf16");
  // `kiln export`: --base-dtype is the base's dtype (its --dtype is the output's)
  CLI::App exp;
  app::ModelSpec e;
  std::string out_dtype;
  exp.add_option("--base-dtype", e.dtype);
  exp.add_option("--dtype", out_dtype);
  exp.parse(std::vector<std::string>{"bf16", "--dtype"});
  CHECK_FALSE(app::given_model_options(exp).dtype);
  exp.parse(std::vector<std::string>{"bf16", "--base-dtype"});
  CHECK(app::given_model_options(exp).dtype);

  // flags as the command line gives them: `--nf4 false` is a value, not a stray argument
  CLI::App cli;
  app::ModelSpec parsed;
  app::add_model_options(cli, parsed);
  cli.parse(std::vector<std::string>{"false", "--nf4", adapter.string(), "--adapter"});  // CLI11 takes them reversed
  CHECK(parsed.adapter == adapter.string());
  CHECK_FALSE(parsed.nf4);
  CHECK(app::given_model_options(cli).nf4);
  CHECK_FALSE(app::given_model_options(cli).seed);

  std::ofstream(adapter / "kiln_base.json") << "{\"format\": \"kiln-adapter-base-1\"}";
  spec = {};
  spec.adapter = adapter.string();
  REQUIRE_THROWS_WITH(app::apply_adapter_base(spec, nullptr, {}), ContainsSubstring("[adapter]") &&
                                                                       ContainsSubstring("kiln_base.json: malformed"));
  fs::remove_all(root);
}

TEST_CASE("finetune: boolean flags accept --flag, --flag=false and --flag false", "[finetune][cli]") {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--chunked-head", "false", "--resume"}, {"--chunked-head=false", "--resume", "true"}, {"--chunked-head=0", "--resume"}}) {
    CLI::App cli;
    app::FinetuneConfig c;
    app::add_finetune_options(cli, c);
    std::vector<std::string> reversed(args.rbegin(), args.rend());
    cli.parse(reversed);
    CAPTURE(args);
    CHECK_FALSE(c.chunked_head);
    CHECK(c.resume);
  }
  CLI::App cli;
  app::FinetuneConfig c;
  app::add_finetune_options(cli, c);
  REQUIRE_FALSE(c.skip_nonfinite_steps);  // a NaN/inf step stops the run unless asked otherwise
  cli.parse(std::vector<std::string>{"--skip-nonfinite-steps"});
  CHECK(c.skip_nonfinite_steps);
}

TEST_CASE("eval: an empty file, nothing to score and sequences past max_position_embeddings", "[eval][cli]") {
  const fs::path root = test::scratch_dir("cli", "eval");
  std::ofstream(root / "config.json") << R"({"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "max_position_embeddings": 6, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true})";
  app::EvalCommand c;
  c.model.config = (root / "config.json").string();
  c.model.device = "cpu";
  c.output = (root / "out.jsonl").string();
  c.ids = (root / "empty.jsonl").string();
  std::ofstream(c.ids) << "\n\n";
  REQUIRE_THROWS_WITH(app::run_eval(c), ContainsSubstring("[eval]") && ContainsSubstring("holds no sequences"));
  c.ids = (root / "short.jsonl").string();
  std::ofstream(c.ids) << "[5]\n[7]\n{\"input_ids\": [1, 2], \"labels\": [1, -100]}\n";
  REQUIRE_THROWS_WITH(app::run_eval(c), ContainsSubstring("[eval]") && ContainsSubstring("no token to score") &&
                                            ContainsSubstring("at least 2 tokens"));
  c.ids = (root / "long.jsonl").string();
  std::ofstream(c.ids) << "[1, 2, 3]\n[1, 2, 3, 4, 5, 6, 7, 8]\n";
  const app::EvalSummary sum = app::run_eval(c);
  CHECK(sum.tokens == 2 + 7);
  REQUIRE(sum.warnings.size() == 1);
  CHECK_THAT(sum.warnings[0], ContainsSubstring("1 sequence(s) are longer than the model's max_position_embeddings of 6") &&
                                  ContainsSubstring("8 tokens"));
  CHECK(std::isnan(app::EvalSummary{}.perplexity()));  // no scored token: no perplexity, not 1.0
  fs::remove_all(root);
}

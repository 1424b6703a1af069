// `kiln finetune` end to end on a tiny model (its parts and Trainer, without the terminal output): a
// run stopped like Ctrl-C and resumed gives exactly the losses, adapter and sample of an uninterrupted
// one; incompatible or corrupt checkpoints are clear errors; the TOML settings round trip; metrics.jsonl
// and the SVG are written. The Trainer itself is tested without the command line in test_trainer.cpp.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <unistd.h>

#include "examples/kiln/finetune.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

// A small corpus (verses in the style of the default one) and a small Llama over the default
// tokenizer's 4,096 ids.
app::FinetuneConfig tiny_run(const fs::path& root, const std::string& output) {
  const fs::path text = root / "corpus.txt";
  if (!fs::exists(text)) {
    std::ofstream out(text);
    const char* lines[] = {"In the beginning God created the heaven and the earth.",
                           "And the earth was without form, and void; and darkness was upon the face of the deep.",
                           "And God said, Let there be light: and there was light.",
                           "And God saw the light, that it was good: and God divided the light from the darkness."};
    for (int d = 0; d < 12; ++d) {
      for (int l = 0; l < 4; ++l) out << lines[(d + l) % 4] << " ";
      out << "\n\n";
    }
    std::ofstream(root / "config.json") << R"({"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
      "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "bos_token_id": 3840, "eos_token_id": 3841})";
  }
  app::FinetuneConfig c;
  c.config = (root / "config.json").string();
  c.random_init = true;
  c.data = text.string();
  c.text_split = "blank_lines";
  c.eval_fraction = 0.2;
  c.seq_len = 16;
  c.batch_size = 2;
  c.grad_accum = 2;
  c.steps = 6;
  c.lora_r = 4;
  c.lora_dropout = 0.1;  // exercises the saved RNG state
  c.warmup = 2;
  c.eval_every = 3;
  c.eval_batches = 2;
  c.save_every = 0;
  c.log_every = 1;
  c.sample_tokens = 4;
  c.device = "cpu";
  c.output = (root / output).string();
  return c;
}

// Asks the trainer to stop after `n` steps of this fit(), as the command's Ctrl-C handler does.
struct StopAfter : train::Callback {
  explicit StopAfter(int64_t n) : n_(n) {}
  void on_train_begin(train::Trainer& t) override { first_ = t.state().step; }
  void on_step_end(train::Trainer& t, const train::StepInfo& s) override {
    if (s.step - first_ >= n_) t.request_stop();
  }
  int64_t n_, first_ = 0;
};

app::FinetuneResult run(const app::FinetuneConfig& c, int64_t stop_after = 0) {
  app::FinetuneJob job(c);
  if (stop_after > 0) job.trainer().add_callback(std::make_shared<StopAfter>(stop_after));
  return job.run();
}

}  // namespace

TEST_CASE("finetune: a resumed run reproduces the uninterrupted one exactly", "[finetune]") {
  const fs::path root = test::scratch_dir("ft", "resume");
  const app::FinetuneResult full = run(tiny_run(root, "full"));
  REQUIRE(full.losses.size() == 6);
  REQUIRE(full.last_step == 6);
  REQUIRE(full.eval_losses.size() == 2);
  REQUIRE_FALSE(full.sample.empty());

  app::FinetuneConfig c = tiny_run(root, "parts");
  const app::FinetuneResult first = run(c, 3);  // as if Ctrl-C came after step 3
  REQUIRE(first.interrupted);
  REQUIRE(first.last_step == 3);
  REQUIRE(fs::exists(fs::path(c.output) / "checkpoint-3" / "adapter" / "adapter_model.safetensors"));
  c.resume = true;
  const app::FinetuneResult second = run(c);
  REQUIRE(second.first_step == 3);
  REQUIRE(second.last_step == 6);
  std::vector<double> joined = first.losses;
  joined.insert(joined.end(), second.losses.begin(), second.losses.end());
  REQUIRE(joined == full.losses);  // bit for bit
  REQUIRE(second.sample == full.sample);
  const auto a = io::SafetensorsFile::open((fs::path(tiny_run(root, "full").output) / "adapter" / "adapter_model.safetensors").string());
  const auto b = io::SafetensorsFile::open((fs::path(c.output) / "adapter" / "adapter_model.safetensors").string());
  REQUIRE(a.keys() == b.keys());
  for (const std::string& k : a.keys()) test::require_equal(a.get(k), b.get(k));

  // What a user sees: metrics.jsonl has a line per step plus one per eval; the SVG and config exist.
  std::istringstream lines(test::read_file(fs::path(c.output) / "metrics.jsonl"));
  int n = 0;
  for (std::string line; std::getline(lines, line);) ++n;
  REQUIRE(n == 6 + 2);
  REQUIRE(test::read_file(fs::path(c.output) / "loss_curve.svg").find("<polyline") != std::string::npos);
  REQUIRE(fs::exists(fs::path(c.output) / "config.toml"));
  fs::remove_all(root);
}

TEST_CASE("finetune: --compile trains with the eager losses", "[finetune][compile]") {
  const fs::path root = test::scratch_dir("ft", "compile");
  app::FinetuneConfig eager = tiny_run(root, "eager");
  eager.lora_dropout = 0.0;  // dropout masks are drawn per call in both, but keep the comparison plain
  app::FinetuneConfig compiled = eager;
  compiled.output = (root / "compiled").string();
  compiled.compile = true;
  const app::FinetuneResult a = run(eager);
  const app::FinetuneResult b = run(compiled);
  REQUIRE(a.losses.size() == b.losses.size());
  REQUIRE(a.losses.size() == 6);
  for (size_t i = 0; i < a.losses.size(); ++i) {
    CAPTURE(i, a.losses[i], b.losses[i]);
    CHECK(std::abs(a.losses[i] - b.losses[i]) <= 1e-4 * std::abs(a.losses[i]));
  }
  REQUIRE(a.losses.front() != a.losses.back());  // it trained
}

TEST_CASE("finetune: --full trains every weight, resumes exactly and writes a model folder that loads back", "[finetune]") {
  const fs::path root = test::scratch_dir("ft", "full");
  app::FinetuneConfig c = tiny_run(root, "whole");
  c.full = true;
  c.base = "bf16";  // an NF4 base cannot be trained
  c.lora_dropout = 0.0;
  app::FinetuneJob job(c);
  const std::vector<Tensor> before = [&] {
    std::vector<Tensor> t;
    for (const auto& [name, p] : job.model().named_parameters()) t.push_back(p.detach().clone());
    return t;
  }();
  const app::FinetuneResult whole = job.run();
  REQUIRE(whole.losses.size() == 6);
  REQUIRE(whole.losses.back() < whole.losses.front());
  REQUIRE_FALSE(fs::exists(fs::path(c.output) / "adapter"));
  // The model folder holds the trained weights, every one of them changed by training.
  const fs::path model_dir = fs::path(c.output) / "model";
  REQUIRE(fs::exists(model_dir / "config.json"));
  REQUIRE(fs::exists(model_dir / "tokenizer.json"));
  auto saved = nn::Llama::from_pretrained(model_dir.string(), nn::LlamaOptions{});
  const auto trained = job.model().named_parameters(), loaded = saved->named_parameters();
  REQUIRE(trained.size() == loaded.size());
  for (size_t i = 0; i < trained.size(); ++i) {
    CAPTURE(trained[i].first);
    REQUIRE(trained[i].first == loaded[i].first);
    test::require_equal(loaded[i].second, trained[i].second);
    REQUIRE_FALSE(test::all_close(trained[i].second, before[i], 0.0, 0.0));  // embeddings, norms, every linear
  }
  // Stopped after 3 steps and resumed: the same losses bit for bit (checkpoints hold every weight).
  app::FinetuneConfig parts = tiny_run(root, "parts");
  parts.full = true;
  parts.base = "bf16";
  parts.lora_dropout = 0.0;
  const app::FinetuneResult first = run(parts, 3);
  REQUIRE(fs::exists(fs::path(parts.output) / "checkpoint-3" / "trainable.safetensors"));
  parts.resume = true;
  const app::FinetuneResult second = run(parts);
  std::vector<double> joined = first.losses;
  joined.insert(joined.end(), second.losses.begin(), second.losses.end());
  REQUIRE(joined == whole.losses);
  // An NF4 base cannot be trained in full: a clear error before anything runs.
  app::FinetuneConfig nf4 = tiny_run(root, "nf4");
  nf4.full = true;
  nf4.base = "nf4";
  REQUIRE_THROWS_WITH(app::FinetuneJob(nf4), ContainsSubstring("--full") && ContainsSubstring("--base bf16"));
  fs::remove_all(root);
}

TEST_CASE("finetune: incompatible, corrupt or missing checkpoints are clear errors", "[finetune]") {
  const fs::path root = test::scratch_dir("ft", "bad");
  app::FinetuneConfig c = tiny_run(root, "run");
  c.steps = 2;
  c.sample_tokens = 0;
  run(c);

  app::FinetuneConfig other = c;
  other.resume = true;
  other.lora_r = 8;
  REQUIRE_THROWS_WITH(run(other), ContainsSubstring("lora_r: checkpoint '4', now '8'"));
  other = c;
  other.resume = true;
  other.seq_len = 24;
  REQUIRE_THROWS_WITH(run(other), ContainsSubstring("seq_len"));

  app::FinetuneConfig resume = c;
  resume.resume = true;
  const fs::path state = fs::path(c.output) / "checkpoint-2" / "trainer_state.json";
  const std::string good = test::read_file(state);
  std::ofstream(state) << good.substr(0, good.size() / 2);
  REQUIRE_THROWS_WITH(run(resume), ContainsSubstring("corrupt trainer state"));
  std::ofstream(state) << good;
  fs::resize_file(fs::path(c.output) / "checkpoint-2" / "optimizer.safetensors", 100);
  REQUIRE_THROWS_AS(run(resume), Error);

  app::FinetuneConfig fresh = tiny_run(root, "empty");
  fresh.resume = true;
  REQUIRE_THROWS_WITH(run(fresh), ContainsSubstring("no checkpoint"));
  fs::remove_all(root);
}

TEST_CASE("finetune: settings from TOML round trip; bad files and values are errors", "[finetune]") {
  const fs::path root = test::scratch_dir("ft", "toml");
  app::FinetuneConfig c = tiny_run(root, "x");
  c.target_modules = {"q_proj", "down_proj"};
  c.lr = 3e-4;
  c.schedule = "linear";
  std::ofstream(root / "run.toml") << c.to_toml();
  app::FinetuneConfig back;
  back.load_toml((root / "run.toml").string());
  REQUIRE(back.fingerprint() == c.fingerprint());
  REQUIRE(back.to_toml() == c.to_toml());

  std::ofstream(root / "unknown.toml") << "lora_rank = 4\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "unknown.toml").string()), ContainsSubstring("unknown setting 'lora_rank'"));
  std::ofstream(root / "type.toml") << "seq_len = \"long\"\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "type.toml").string()), ContainsSubstring("'seq_len' must be a non-negative integer"));
  std::ofstream(root / "syntax.toml") << "seq_len = = 3\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "syntax.toml").string()), ContainsSubstring("syntax.toml:1"));
  // Inputs toml++ 3.3 asserts or hits __builtin_unreachable on (tests/fuzz/regressions/finetune_config): refused first.
  std::ofstream(root / "header.toml") << "seq_len = 3\n[ = 3\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "header.toml").string()), ContainsSubstring("header.toml:2: a table header needs a key"));
  std::ofstream(root / "latin1.toml") << "lr = 1\xc3\xa9\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "latin1.toml").string()), ContainsSubstring("latin1.toml:1: a non-ASCII character"));
  // A quote after a value opens no string for toml++, which then reads what follows as bare text (the
  // 10-minute fuzz run's input): unterminated strings are refused first, single- and multi-line.
  std::ofstream(root / "quote.toml") << "seq_len = 3\ne=0\"n\xef\xbb\xaf";
  REQUIRE_THROWS_WITH(back.load_toml((root / "quote.toml").string()),
                      ContainsSubstring("quote.toml:2: a quote after '0'"));
  std::ofstream(root / "closed.toml") << "e=0\"n\xef\xbb\xaf 2 # x\"]\n";  // closed later on the line: still no string
  REQUIRE_THROWS_WITH(back.load_toml((root / "closed.toml").string()), ContainsSubstring("closed.toml:1: a quote after '0'"));
  std::ofstream(root / "open.toml") << "data = '''\n\xc3\xa9\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "open.toml").string()), ContainsSubstring("open.toml:1: an unterminated string"));
  std::ofstream(root / "brace.toml") << "u=[[[[}[\t\t-";
  REQUIRE_THROWS_WITH(back.load_toml((root / "brace.toml").string()), ContainsSubstring("brace.toml:1: '}' outside a string"));
  // Non-ASCII text inside strings (all four kinds, escapes, several lines) and comments still loads.
  std::ofstream(root / "utf8.toml") << "# caf\xc3\xa9 [ = \n"
                                    << "sample_prompt = \"Caf\xc3\xa9 \\\" [ = \xe2\x80\x94\"\n"
                                    << "output = 'runs/\xc3\xa9t\xc3\xa9'\n"
                                    << "data = \"\"\"\n[ = \xc3\xa9\n\"\"\"\n"
                                    << "tokenizer = '''\n\xc3\xa9'''  # \xc3\xa9\n"
                                    << "target_modules = [\"q_proj\", # \xc3\xa9\n  \"v_proj\"]\n";
  back.load_toml((root / "utf8.toml").string());
  REQUIRE(back.sample_prompt == "Caf\xc3\xa9 \" [ = \xe2\x80\x94");
  REQUIRE(back.output == "runs/\xc3\xa9t\xc3\xa9");
  REQUIRE(back.data == "[ = \xc3\xa9\n");
  REQUIRE(back.tokenizer == "\xc3\xa9");
  REQUIRE(back.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  // toml++ never meets a non-ASCII character where it may test for whitespace: a basic string's go in as
  // escapes (the 10-minute fuzz run's input: a second '=' on the line, then a string toml++ reads as bare
  // text), a literal string's after a parse with them as ASCII.
  std::ofstream(root / "second_equals.toml") << "seq_len = 20a=\"n\xef\xbb\xaf\"size = 4\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "second_equals.toml").string()), ContainsSubstring("second_equals.toml:1:"));
  std::ofstream(root / "trimmed.toml") << "sample_prompt = \"\"\"caf\\\n  \xc3\xa9 \xf0\x9f\x94\xa5\"\"\"\n"
                                       << "output = 'x\xe2\x80\x94y'\n";
  back.load_toml((root / "trimmed.toml").string());
  REQUIRE(back.sample_prompt == "caf\xc3\xa9 \xf0\x9f\x94\xa5");  // the line-ending backslash trims up to the first non-space
  REQUIRE(back.output == "x\xe2\x80\x94y");
  std::ofstream(root / "not_utf8.toml") << "output = \"a\xc3(\"\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "not_utf8.toml").string()), ContainsSubstring("not_utf8.toml:1: a string holds bytes that are not UTF-8"));
  std::ofstream(root / "escape.toml") << "output = \"a\\\xc3\xa9\"\n";
  REQUIRE_THROWS_WITH(back.load_toml((root / "escape.toml").string()), ContainsSubstring("escape.toml:1: a backslash before a non-ASCII character"));
  std::ofstream(root / "date.toml") << "lr = 1e-4\nseq_len = 1---------- 0\n";  // toml++ asserts on a date-like value, a space, a digit
  REQUIRE_THROWS_WITH(back.load_toml((root / "date.toml").string()), ContainsSubstring("date.toml:2: '1----------' is no number"));
  std::ofstream(root / "literal_bad.toml") << "output = 'a\xc3\xa9' 3\n";  // refused by the ASCII parse, file:line kept
  REQUIRE_THROWS_WITH(back.load_toml((root / "literal_bad.toml").string()), ContainsSubstring("literal_bad.toml:1:"));

  app::FinetuneConfig bad = tiny_run(root, "y");
  bad.base = "int8";
  REQUIRE_THROWS_WITH(bad.validate(), ContainsSubstring("--base must be nf4 or bf16"));
  bad = tiny_run(root, "y");
  bad.random_init = false;
  REQUIRE_THROWS_WITH(bad.validate(), ContainsSubstring("--random-init"));
  fs::remove_all(root);
}

TEST_CASE("finetune: --memory-budget plans the checkpoints and the loss chunk, prints the plan, keeps the losses",
          "[finetune][memory_plan]") {
  const fs::path root = test::scratch_dir("ft", "memplan");
  // Without --checkpointing the default is a plan within the free memory: nothing checkpointed here.
  app::FinetuneConfig roomy = tiny_run(root, "roomy");
  app::FinetuneJob a(roomy);
  REQUIRE(a.trainer().memory_plan().has_value());
  CHECK_THAT(a.trainer().memory_plan()->describe(), ContainsSubstring("memory plan for batches of 2 x 16 tokens") &&
                                                        ContainsSubstring("2 of 2 kept whole") &&
                                                        ContainsSubstring("predicted peak"));
  const app::FinetuneResult ra = a.run();
  // A budget just above the smallest plan: both layers checkpointed, alone or in one segment (one layer
  // input apart: within the 0.01 MiB steps below); the same losses (the recompute is exact; every chunk
  // holds the whole batch here).
  app::FinetuneConfig tight = tiny_run(root, "tight");
  tight.memory_budget = 1e-9;  // far too small: the error names the least budget
  double least_mib = 0;
  try {
    app::FinetuneJob refused(tight);
    FAIL("a budget below the least plan was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, ContainsSubstring("[memory plan]") && ContainsSubstring("needs at least"));
    const size_t at = msg.find("needs at least ") + std::string("needs at least ").size();
    least_mib = std::stod(msg.substr(at));
    REQUIRE(msg.substr(msg.find(' ', at) + 1, 3) == "MiB");
  }
  // The message rounds to 0.1 MiB: the first budget from 0.05 MiB below it, in steps of 0.01 MiB, that
  // a job accepts is within 0.01 MiB of the least.
  std::unique_ptr<app::FinetuneJob> accepted;
  for (int i = 0; i <= 10 && !accepted; ++i) {
    tight.memory_budget = (least_mib - 0.05 + 0.01 * i) / 1024.0;  // GiB
    fs::remove_all(tight.output);
    try {
      accepted = std::make_unique<app::FinetuneJob>(tight);
    } catch (const Error& e) {
      CHECK_THAT(e.what(), ContainsSubstring("needs at least"));
    }
  }
  REQUIRE(accepted);
  app::FinetuneJob& b = *accepted;
  REQUIRE(b.trainer().memory_plan().has_value());
  CHECK_THAT(b.trainer().memory_plan()->describe(),
             ContainsSubstring("all 2 in 1 segment of 2") || ContainsSubstring("2 checkpointed (0-1)"));
  const app::FinetuneResult rb = b.run();
  REQUIRE(rb.losses.size() == ra.losses.size());
  for (size_t i = 0; i < ra.losses.size(); ++i) CHECK(rb.losses[i] == Catch::Approx(ra.losses[i]).epsilon(1e-5));
  // The MLP in pieces of 5 tokens: the plan measures the layers as they run. The first loss is the
  // same; weight gradients summed per piece round differently, which AdamW's normalised steps carry
  // into the later losses (1e-4 relative here).
  app::FinetuneConfig pieces = tiny_run(root, "pieces");
  pieces.mlp_chunk = 5;
  const app::FinetuneResult rp = app::FinetuneJob(pieces).run();
  REQUIRE(rp.losses.size() == ra.losses.size());
  CHECK(rp.losses[0] == Catch::Approx(ra.losses[0]).epsilon(1e-6));
  for (size_t i = 0; i < ra.losses.size(); ++i) CHECK(rp.losses[i] == Catch::Approx(ra.losses[i]).epsilon(2e-3));
  // --checkpointing is an explicit choice: no plan
  app::FinetuneConfig all = tiny_run(root, "all");
  all.checkpointing = true;
  CHECK_FALSE(app::FinetuneJob(all).trainer().memory_plan().has_value());
  app::FinetuneConfig unchunked = tiny_run(root, "unchunked");
  unchunked.chunked_head = false;
  unchunked.memory_budget = 1;
  REQUIRE_THROWS_WITH(unchunked.validate(), ContainsSubstring("--memory-budget plans for the chunked loss head"));
  // --offload goes with --checkpointing, and only where a GPU holds the activations
  app::FinetuneConfig off = tiny_run(root, "offload");
  off.offload = true;
  REQUIRE_THROWS_WITH(off.validate(), ContainsSubstring("add --checkpointing"));
  off.checkpointing = true;
  REQUIRE_THROWS_WITH(app::FinetuneJob(off), ContainsSubstring("--offload keeps activations in host memory"));
  // --host-memory-budget: not negative, and only for a GPU's plan
  app::FinetuneConfig host = tiny_run(root, "host_budget");
  host.host_memory_budget = -1;
  REQUIRE_THROWS_WITH(host.validate(), ContainsSubstring("--host-memory-budget must be >= 0 GiB"));
  host.host_memory_budget = 2;
  REQUIRE_THROWS_WITH(app::FinetuneJob(host), ContainsSubstring("on cpu nothing is offloaded"));
  // --segment-layers: both blocks in one segment, the losses of --checkpointing; 1, or without
  // --checkpointing, or with --compile: refused
  const app::FinetuneResult rc = app::FinetuneJob(all).run();
  app::FinetuneConfig seg = tiny_run(root, "segments");
  seg.checkpointing = true;
  seg.segment_layers = 2;
  app::FinetuneJob segmented(seg);
  CHECK(segmented.model().layer_activations() ==
        std::vector<nn::LayerActivations>{nn::LayerActivations::checkpoint, nn::LayerActivations::segment});
  const app::FinetuneResult rs = segmented.run();
  REQUIRE(rs.losses.size() == rc.losses.size());
  for (size_t i = 0; i < rc.losses.size(); ++i) CHECK(rs.losses[i] == Catch::Approx(rc.losses[i]).epsilon(1e-6));
  seg.segment_layers = 1;
  REQUIRE_THROWS_WITH(seg.validate(), ContainsSubstring("--segment-layers must be 0 (off) or at least 2"));
  seg.segment_layers = 2;
  seg.checkpointing = false;
  REQUIRE_THROWS_WITH(seg.validate(), ContainsSubstring("add --checkpointing"));
  seg.checkpointing = true;
  seg.compile = true;
  REQUIRE_THROWS_WITH(seg.validate(), ContainsSubstring("--segment-layers with --compile is not supported"));
  app::FinetuneConfig chunk = tiny_run(root, "mlp_chunk");
  chunk.mlp_chunk = -3;
  REQUIRE_THROWS_WITH(chunk.validate(), ContainsSubstring("--mlp-chunk must be 0 (off) or a number of tokens"));
  chunk.mlp_chunk = 8;
  chunk.compile = true;
  REQUIRE_THROWS_WITH(chunk.validate(), ContainsSubstring("use one of them"));
  fs::remove_all(root);
}

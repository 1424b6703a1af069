// kiln's default files (data/default_corpus.h) and the default job: where each file is looked for (the
// environment, beside an installed executable, the source tree), the shipped base model (it loads, has the tiny
// config's shape, and knows the KJV it was pretrained on far better than random weights do), the Devil's
// Dictionary corpus, and a short run of the default job (QLoRA of that base on it) that lowers the loss.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "autograd/grad_mode.h"
#include "data/default_corpus.h"
#include "data/tokenizer.h"
#include "examples/kiln/finetune.h"
#include "nn/llama.h"
#include "tests/helpers.h"
#include "train/trainer.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

// Sets (or, with nullptr, unsets) an environment variable for one scope.
class EnvScope {
 public:
  EnvScope(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) ::setenv(name, value, 1);
    else ::unsetenv(name);
  }
  ~EnvScope() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }
  EnvScope(const EnvScope&) = delete;
  EnvScope& operator=(const EnvScope&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// The corpus at `which`, or SKIP when tools/bootstrap.sh has not written it.
std::string corpus_or_skip(data::DefaultFile which) {
  try {
    return data::find_default_file(which);
  } catch (const Error& e) {
    SKIP(e.what());
  }
  return "";
}

// The mean next-token loss of `model` over the first batch (4 x 128 tokens) of `docs` packed in order.
double mean_loss(nn::Llama& model, const std::vector<data::Document>& docs) {
  data::PackOptions o;
  o.seq_len = 128;
  o.batch_size = 4;
  o.shuffle = false;
  o.epochs = 1;
  data::PackedDataset ds(docs, o);
  const std::optional<data::Batch> batch = ds.next();
  REQUIRE(batch.has_value());
  autograd::NoGradGuard no_grad;
  const Tensor sum = train::llama_loss(false)(model, *batch);
  return sum.item<double>() / static_cast<double>(batch->n_loss_tokens);
}

}  // namespace

TEST_CASE("default files: $VAR, then beside the installed executable, then the source tree", "[defaults]") {
  const fs::path prefix = test::scratch_dir("defaults", "prefix");
  fs::create_directories(prefix / "bin");
  std::ofstream(prefix / "bin" / "kiln") << "";
  CHECK(data::installed_data_dir((prefix / "bin" / "kiln").string()) == (prefix / "share" / "kiln").string());

  EnvScope no_tokenizer("KILN_DEFAULT_TOKENIZER", nullptr);
  EnvScope no_base("KILN_DEFAULT_BASE", nullptr);
  const std::string exe = (prefix / "bin" / "kiln").string();
  // Nothing installed beside it: the source tree's files.
  const std::string source_tokenizer = data::find_default_file(data::DefaultFile::tokenizer, exe);
  CHECK(fs::path(source_tokenizer).filename() == "tokenizer.json");
  CHECK(source_tokenizer.find(prefix.string()) == std::string::npos);
  // Installed beside it: those win.
  fs::create_directories(prefix / "share" / "kiln" / "default" / "base");
  fs::copy_file(source_tokenizer, prefix / "share" / "kiln" / "default" / "tokenizer.json");
  CHECK(data::find_default_file(data::DefaultFile::tokenizer, exe) ==
        (prefix / "share" / "kiln" / "default" / "tokenizer.json").string());
  // A folder counts as the base only with its config.json.
  CHECK(data::find_default_file(data::DefaultFile::base, exe).find(prefix.string()) == std::string::npos);
  std::ofstream(prefix / "share" / "kiln" / "default" / "base" / "config.json") << "{}";
  CHECK(data::find_default_file(data::DefaultFile::base, exe) == (prefix / "share" / "kiln" / "default" / "base").string());
  {  // The environment wins over both, and a wrong value is an error naming it (no quiet fallback).
    EnvScope env("KILN_DEFAULT_TOKENIZER", source_tokenizer.c_str());
    CHECK(data::find_default_file(data::DefaultFile::tokenizer, exe) == source_tokenizer);
    EnvScope wrong("KILN_DEFAULT_TOKENIZER", "/nonexistent/kiln/tokenizer.json");
    REQUIRE_THROWS_WITH(data::find_default_file(data::DefaultFile::tokenizer, exe),
                        ContainsSubstring("[dataset]") && ContainsSubstring("KILN_DEFAULT_TOKENIZER") &&
                            ContainsSubstring("/nonexistent/kiln/tokenizer.json"));
  }
  {  // Missing everywhere: every place looked at and what makes the file.
    EnvScope corpus("KILN_DEFAULT_CORPUS", "/nonexistent/kiln/devil.txt");
    REQUIRE_THROWS_WITH(data::default_corpus_path(), ContainsSubstring("tools/bootstrap.sh") && ContainsSubstring("dict-devil"));
  }
  fs::remove_all(prefix);
}

TEST_CASE("default base: the shipped model loads with the tiny config's shape, in bf16, a few MB", "[defaults]") {
  const fs::path dir = data::default_base_path();
  const nn::LlamaConfig got = nn::LlamaConfig::from_file((dir / "config.json").string());
  const nn::LlamaConfig tiny = nn::LlamaConfig::named("tiny");
  CHECK(got.vocab_size == tiny.vocab_size);
  CHECK(got.hidden_size == tiny.hidden_size);
  CHECK(got.intermediate_size == tiny.intermediate_size);
  CHECK(got.num_hidden_layers == tiny.num_hidden_layers);
  CHECK(got.num_attention_heads == tiny.num_attention_heads);
  CHECK(got.num_key_value_heads == tiny.num_key_value_heads);
  CHECK(got.head_dim == tiny.head_dim);
  CHECK(got.rope_theta == tiny.rope_theta);
  CHECK(got.tie_word_embeddings == tiny.tie_word_embeddings);
  CHECK(got.bos_token_id == tiny.bos_token_id);
  CHECK(got.eos_token_ids == tiny.eos_token_ids);
  CHECK(got.torch_dtype == DType::bf16);
  CHECK(fs::file_size(dir / "model.safetensors") < 10'000'000);
  // Its tokenizer is kiln's default one.
  const bool same_tokenizer = test::read_file(dir / "tokenizer.json") == test::read_file(data::default_tokenizer_path());
  CHECK(same_tokenizer);
  auto model = nn::Llama::from_pretrained(dir.string());
  CHECK(model->config().num_parameters() == tiny.num_parameters());
}

TEST_CASE("default base: its loss on held-out KJV chapters is far below random weights'", "[defaults]") {
  const std::string kjv = corpus_or_skip(data::DefaultFile::kjv_corpus);
  const data::Tokenizer tok = data::Tokenizer::from_file(data::default_tokenizer_path());
  const auto chapters = data::load_documents(kjv, data::default_corpus_options());
  // The chapters `kiln finetune` held out when it pretrained the base (tools/make_default_base.sh: the
  // default split, 2% with seed 0): text the base never trained on.
  const data::Split split = data::split_indices(static_cast<int64_t>(chapters.size()), data::SplitOptions{0.02, -1, 0});
  REQUIRE(split.eval.size() >= 8);
  std::vector<data::RawDocument> held_out;
  for (size_t i = 0; i < 8; ++i) held_out.push_back(chapters[static_cast<size_t>(split.eval[i])]);
  const auto docs = data::tokenize_documents(tok, held_out);

  auto base = nn::Llama::from_pretrained(data::default_base_path());
  nn::LlamaOptions o;
  o.seed = 0;
  nn::Llama random(nn::LlamaConfig::named("tiny"), o);
  const double trained = mean_loss(*base, docs), untrained = mean_loss(random, docs);
  INFO("held-out KJV loss: pretrained base " << trained << ", random weights " << untrained);
  CHECK(untrained > 8.0);  // ln(4096) = 8.3: no knowledge
  CHECK(trained < 4.5);
  CHECK(untrained - trained > 4.0);
}

TEST_CASE("default corpus: The Devil's Dictionary, one entry per document", "[defaults][dataset]") {
  const std::string path = corpus_or_skip(data::DefaultFile::corpus);
  const auto entries = data::load_documents(path, data::default_corpus_options());
  CHECK(entries.size() == 999);
  CHECK(entries.front().text.rfind("ABASEMENT, n.  A decent and customary mental attitude", 0) == 0);
  CHECK(entries.back().text.rfind("ZOOLOGY, n.  The science and history of the animal kingdom", 0) == 0);
  int64_t defined = 0;  // "WORD, n." / "WORD, v.t." / "WORD, adj." ...: the headword in capitals, then its part of speech
  for (const auto& e : entries) {
    const size_t comma = e.text.find(", ");
    if (comma != std::string::npos && comma > 0 && std::isupper(static_cast<unsigned char>(e.text[0])) &&
        e.text.find('.', comma) < e.text.find('\n'))
      ++defined;
  }
  CHECK(defined > 950);
}

TEST_CASE("default job: QLoRA of the default base on The Devil's Dictionary lowers the loss", "[defaults][finetune]") {
  corpus_or_skip(data::DefaultFile::corpus);
  app::FinetuneConfig c;  // the default job: the shipped base (NF4), the default corpus, its prompt
  c.steps = 16;
  c.seq_len = 64;
  c.batch_size = 4;
  c.warmup = 2;
  c.eval_every = 16;
  c.eval_batches = 2;
  c.save_every = 0;
  c.sample_tokens = 8;
  c.device = "cpu";
  c.output = test::scratch_dir("defaults", "job").string();
  app::FinetuneJob job(c);
  CHECK_THAT(job.banner(), ContainsSubstring("nf4 base") && ContainsSubstring("devil.txt"));
  const app::FinetuneResult r = job.run();
  REQUIRE(r.losses.size() == 16);
  const double first = std::accumulate(r.losses.begin(), r.losses.begin() + 4, 0.0) / 4;
  const double last = std::accumulate(r.losses.end() - 4, r.losses.end(), 0.0) / 4;
  INFO("train loss, mean of the first 4 steps " << first << ", of the last 4 " << last);
  CHECK(last < first - 0.3);
  CHECK(r.sample.rfind(c.sample_prompt, 0) == 0);
  fs::remove_all(c.output);
}

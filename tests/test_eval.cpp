// `kiln eval` (examples/kiln/eval.h): per-sequence causal-LM losses against Llama::loss and against
// log-softmax computed here, log-probabilities and logits, -100 labels, batching, file errors naming
// file:line, and the command on the committed HF fixture (its loss from transformers + peft).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "examples/kiln/eval.h"
#include "nn/llama.h"
#include "io/safetensors.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

std::shared_ptr<nn::Llama> eval_model() {
  nn::LlamaConfig c;
  c.vocab_size = 29;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 1;
  c.head_dim = 6;
  c.rope_theta = 10000;
  nn::LlamaOptions o;
  o.dtype = DType::f64;
  o.seed = 21;
  auto m = std::make_shared<nn::Llama>(c, o);
  autograd::NoGradGuard g;
  Tensor w = m->lm_head_weight();
  copy_(w, mul(w, 10.0));  // logits of a useful spread
  return m;
}

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / ("kiln_test_eval_" + std::to_string(::getpid()) + "_" + name);
}

void write_file(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

std::vector<nlohmann::json> parse_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::string ids_json(const std::vector<int64_t>& v) { return nlohmann::json(v).dump(); }

std::vector<int64_t> random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  Generator gen(seed);
  return randint(0, vocab, {n}, DType::i64, kCPU, &gen).to_vector<int64_t>();
}

}  // namespace

TEST_CASE("eval: losses, log-probabilities and logits of sequences of several lengths", "[eval]") {
  auto m = eval_model();
  const int64_t v = m->config().vocab_size;
  // sequences: two of length 9 (one as a bare array), one of 9 with -100 labels, one of 5, one of 1
  std::vector<app::EvalSequence> want;
  want.push_back({random_ids(9, v, 1), {}, 0});
  want.push_back({random_ids(5, v, 2), {}, 0});
  want.push_back({random_ids(9, v, 3), {}, 0});
  want.push_back({random_ids(9, v, 4), {}, 0});
  want.push_back({random_ids(1, v, 5), {}, 0});
  for (auto& s : want) s.labels = s.input_ids;
  want[2].labels = random_ids(9, v, 6);
  for (size_t j : {0, 1, 4, 8}) want[2].labels[j] = -100;
  const fs::path path = temp_file("ok.jsonl");
  write_file(path, ids_json(want[0].input_ids) + "\n\n" +
                       nlohmann::json{{"input_ids", want[1].input_ids}}.dump() + "\n" +
                       nlohmann::json{{"input_ids", want[2].input_ids}, {"labels", want[2].labels}}.dump() + "\n" +
                       nlohmann::json{{"labels", want[3].labels}, {"input_ids", want[3].input_ids}}.dump() + "\n" +
                       ids_json(want[4].input_ids) + "\n");
  const auto seqs = app::read_eval_file(path.string(), v);
  REQUIRE(seqs.size() == want.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    REQUIRE(seqs[i].input_ids == want[i].input_ids);
    REQUIRE(seqs[i].labels == want[i].labels);
  }
  REQUIRE(seqs[1].line == 3);  // the blank line still counts

  app::EvalOptions o;
  o.logprobs = true;
  o.logits = true;
  o.batch_size = 2;
  m->train();
  std::ostringstream out;
  const app::EvalSummary sum = app::evaluate(*m, seqs, o, out);
  REQUIRE(m->is_training());
  const auto rows = parse_lines(out.str());
  REQUIRE(rows.size() == seqs.size());
  double total = 0;
  int64_t tokens = 0;
  autograd::NoGradGuard g;
  for (size_t i = 0; i < rows.size(); ++i) {
    INFO("sequence " << i);
    const auto& row = rows[i];
    const auto& s = seqs[i];
    const int64_t t = static_cast<int64_t>(s.input_ids.size());
    REQUIRE(row["index"] == i);
    Tensor h = m->forward(from_vector<int64_t>(s.input_ids, {1, t}));  // (1, T, hidden)
    // logits (T, V) as f32
    Tensor logits = reshape(m->logits(h), {t, v});
    REQUIRE(row["logits"].size() == static_cast<size_t>(t));
    const auto lv = logits.to_vector<double>();
    for (int64_t j = 0; j < t; ++j)
      for (int64_t c = 0; c < v; ++c)
        REQUIRE(std::abs(row["logits"][j][c].get<double>() - lv[j * v + c]) <= 1e-6 * std::max(1.0, std::abs(lv[j * v + c])));
    int64_t n = 0;
    for (int64_t j = 1; j < t; ++j) n += s.labels[j] != -100;
    REQUIRE(row["tokens"] == n);
    if (n == 0) {
      REQUIRE(row["loss"].is_null());
      REQUIRE(row["logprobs"].empty());
      continue;
    }
    // against Llama::loss
    const std::vector<int64_t> targets(s.labels.begin() + 1, s.labels.end());
    const double direct = m->loss(narrow(h, 1, 0, t - 1), from_vector<int64_t>(targets, {1, t - 1})).item<double>();
    const double loss = row["loss"].get<double>();
    REQUIRE(std::abs(loss - direct) <= 1e-5 * std::abs(direct));
    // against log-softmax computed here in f64, -100 targets skipped (null)
    REQUIRE(row["logprobs"].size() == static_cast<size_t>(t - 1));
    double lp_sum = 0;
    for (int64_t j = 0; j + 1 < t; ++j) {
      if (targets[j] == -100) {
        REQUIRE(row["logprobs"][j].is_null());
        continue;
      }
      double mx = -INFINITY, z = 0;
      for (int64_t c = 0; c < v; ++c) mx = std::max(mx, lv[j * v + c]);
      for (int64_t c = 0; c < v; ++c) z += std::exp(lv[j * v + c] - mx);
      const double want_lp = lv[j * v + targets[j]] - mx - std::log(z);
      REQUIRE(std::abs(row["logprobs"][j].get<double>() - want_lp) <= 1e-5 * std::max(1.0, std::abs(want_lp)));
      lp_sum += row["logprobs"][j].get<double>();
    }
    REQUIRE(std::abs(lp_sum + loss * static_cast<double>(n)) <= 1e-5 * std::abs(lp_sum));
    total += loss * static_cast<double>(n);
    tokens += n;
  }
  REQUIRE(sum.sequences == 5);
  REQUIRE(sum.tokens == tokens);
  REQUIRE(std::abs(sum.mean_loss() - total / static_cast<double>(tokens)) <= 1e-6 * sum.mean_loss());
  REQUIRE(std::abs(sum.perplexity() - std::exp(sum.mean_loss())) <= 1e-12 * sum.perplexity());

  // one by one (no logits or logprobs asked): the same losses, and only the three keys
  o = {};
  o.batch_size = 1;
  std::ostringstream out1;
  app::evaluate(*m, seqs, o, out1);
  const auto rows1 = parse_lines(out1.str());
  for (size_t i = 0; i < rows.size(); ++i) {
    REQUIRE(rows1[i].size() == 3);
    if (rows[i]["loss"].is_null()) REQUIRE(rows1[i]["loss"].is_null());
    else REQUIRE(std::abs(rows1[i]["loss"].get<double>() - rows[i]["loss"].get<double>()) <= 1e-6 * rows[i]["loss"].get<double>());
  }
  fs::remove(path);
}

TEST_CASE("eval: bad files are errors naming file:line", "[eval]") {
  const fs::path path = temp_file("bad.jsonl");
  const std::string p = path.string();
  auto fails_with = [&](const std::string& text, const std::string& where, const std::string& what) {
    write_file(path, text);
    INFO(text);
    REQUIRE_THROWS_WITH(app::read_eval_file(p, 10),
                        ContainsSubstring("[eval]") && ContainsSubstring(p + ":" + where) && ContainsSubstring(what));
  };
  fails_with("[1, 2, 3]\n[1, 2\n", "2", "not valid JSON");
  fails_with("[1, 2, 3]\n\n[1, 10]\n", "3", "outside the vocabulary");
  fails_with("[-100, 2]\n", "1", "outside the vocabulary");
  fails_with("[1, 2.5]\n", "1", "not an integer");
  fails_with("[]\n", "1", "empty");
  fails_with("\"text\"\n", "1", "expected an array");
  fails_with("{\"input_ids\": [1, 2], \"labels\": [1]}\n", "1", "1 labels for 2 input_ids");
  fails_with("[1]\n{\"input_ids\": [1, 2], \"label\": [1, 2]}\n", "2", "unexpected key \"label\"");
  fails_with("{\"labels\": [1, 2]}\n", "1", "no \"input_ids\"");
  fails_with("{\"input_ids\": [1, 2], \"labels\": [1, 11]}\n", "1", "and is not -100");
  fails_with("{\"input_ids\": \"1 2\"}\n", "1", "expected input_ids as a JSON array");
  fs::remove(path);
  REQUIRE_THROWS_WITH(app::read_eval_file(p, 10), ContainsSubstring("[eval] cannot open"));
}

TEST_CASE("eval: the command gives transformers' loss on the HF fixture with its adapter", "[eval]") {
  const fs::path dir = test::test_data("llama/gqa1_hd64_tied_llama3rope");
  const io::SafetensorsFile ref = io::SafetensorsFile::open((dir / "reference.safetensors").string());
  const Tensor ids = ref.get("input_ids");    // (B, T)
  const Tensor labels = ref.get("labels");    // (B, T)
  const int64_t b = ids.size(0), t = ids.size(1);
  const auto iv = ids.to_vector<int64_t>();
  const auto lv = labels.to_vector<int64_t>();
  std::string text;
  for (int64_t i = 0; i < b; ++i)
    text += nlohmann::json{{"input_ids", std::vector<int64_t>(iv.begin() + i * t, iv.begin() + (i + 1) * t)},
                           {"labels", std::vector<int64_t>(lv.begin() + i * t, lv.begin() + (i + 1) * t)}}
                .dump() +
            "\n";
  const fs::path in = temp_file("fixture.jsonl"), out = temp_file("fixture_out.jsonl");
  write_file(in, text);
  // through the command line, as a user runs it
  CLI::App app;
  app::add_eval_command(app);
  std::vector<std::string> args{"eval", "--model", dir.string(), "--adapter", (dir / "adapter").string(), "--device",
                                "cpu", "--dtype", "f32", "--ids", in.string(), "--output", out.string(),
                                "--batch-size", "2", "--logprobs"};
  std::reverse(args.begin(), args.end());  // CLI11 takes them last-first
  app.parse(args);
  std::ifstream f(out);
  std::stringstream buf;
  buf << f.rdbuf();
  const auto rows = parse_lines(buf.str());
  REQUIRE(rows.size() == static_cast<size_t>(b));
  double nll = 0;
  int64_t tokens = 0;
  for (const auto& row : rows) {
    nll += row["loss"].get<double>() * row["tokens"].get<double>();
    tokens += row["tokens"].get<int64_t>();
    double lp = 0;
    for (const auto& x : row["logprobs"])
      if (!x.is_null()) lp += x.get<double>();
    REQUIRE(std::abs(lp + row["loss"].get<double>() * row["tokens"].get<double>()) <= 1e-4);
  }
  int64_t want_tokens = 0;
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 1; j < t; ++j) want_tokens += lv[i * t + j] != -100;
  REQUIRE(tokens == want_tokens);
  const double want = ref.get("loss").item<double>();
  INFO("eval loss " << nll / tokens << ", transformers " << want);
  REQUIRE(std::abs(nll / static_cast<double>(tokens) - want) <= 1e-5);
  fs::remove(in);
  fs::remove(out);
}

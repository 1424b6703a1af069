// `kiln eval`: per-sequence causal-LM loss (and optionally per-token log-probabilities and full
// logits) of token-id JSONL files, batching sequences of equal length, output as JSONL.
#include "examples/kiln/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fmt/format.h>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "autograd/grad_mode.h"
#include "core/error.h"
#include "core/json_int.h"
#include "core/ops.h"
#include "examples/kiln/adapter_base.h"

namespace kiln::app {

namespace {

std::vector<int64_t> read_ids(const nlohmann::json& j, const char* what, bool allow_ignore, int64_t vocab,
                              const std::string& where) {
  KILN_CHECK(j.is_array(), "eval", "{}: expected {} as a JSON array of token ids, found {}", where, what, j.type_name());
  KILN_CHECK(!j.empty(), "eval", "{}: {} is empty", where, what);
  std::vector<int64_t> ids;
  ids.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    const std::optional<int64_t> parsed = json_int(j[i]);
    KILN_CHECK(parsed, "eval", "{}: {}[{}] is not an integer: {}", where, what, i, json_shown(j[i]));
    const int64_t id = *parsed;
    KILN_CHECK((id >= 0 && id < vocab) || (allow_ignore && id == -100), "eval",
               "{}: {}[{}] = {} is outside the vocabulary [0, {}){}", where, what, i, id, vocab,
               allow_ignore ? " and is not -100" : "");
    ids.push_back(id);
  }
  return ids;
}

// A float as the shortest text that reads back to it; JSON has no NaN or infinity.
void write_number(std::string& s, double v) {
  if (std::isfinite(v)) fmt::format_to(std::back_inserter(s), "{}", v);
  else s += "null";
}
void write_number(std::string& s, float v) {
  if (std::isfinite(v)) fmt::format_to(std::back_inserter(s), "{}", v);
  else s += "null";
}

// Scores one batch of sequences of equal length T and returns their JSON lines (no newline).
std::vector<std::string> score_batch(nn::Llama& model, const std::vector<const EvalSequence*>& batch,
                                     const std::vector<int64_t>& indices, const EvalOptions& o, EvalSummary& sum) {
  const int64_t b = static_cast<int64_t>(batch.size());
  const int64_t t = static_cast<int64_t>(batch[0]->input_ids.size());
  const int64_t v = model.config().vocab_size;
  const Device device = model.lm_head_weight().device();
  std::vector<int64_t> ids, targets;  // (B, T), (B, T-1)
  for (const EvalSequence* s : batch) {
    ids.insert(ids.end(), s->input_ids.begin(), s->input_ids.end());
    targets.insert(targets.end(), s->labels.begin() + 1, s->labels.end());
  }
  std::vector<float> nll;     // (B, T-1) per-target cross-entropy, 0 where ignored
  std::vector<float> logits;  // (B, T, V) when asked for
  if (t > 1 || o.logits) {
    Tensor hidden = model.forward(from_vector<int64_t>(ids, {b, t}, device));  // (B, T, hidden)
    // the last position predicts nothing: its logits are only computed when asked for
    Tensor lg = cast(model.logits(o.logits ? hidden : narrow(hidden, 1, 0, t - 1)), DType::f32);  // (B, T or T-1, V)
    if (o.logits) logits = lg.to_vector<float>();
    if (t > 1) {
      Tensor tg = from_vector<int64_t>(targets, {b * (t - 1)}, device);  // (B*(T-1))
      Tensor scored = reshape(narrow(lg, 1, 0, t - 1), {b * (t - 1), v});  // (B*(T-1), V)
      nll = cross_entropy(scored, tg, -100, Reduction::none).to_vector<float>();
    }
  }
  std::vector<std::string> lines;
  for (int64_t i = 0; i < b; ++i) {
    double total = 0;
    int64_t count = 0;
    for (int64_t j = 0; j + 1 < t; ++j) {
      if (targets[static_cast<size_t>(i * (t - 1) + j)] == -100) continue;
      total += nll[static_cast<size_t>(i * (t - 1) + j)];
      ++count;
    }
    sum.sequences += 1;
    sum.tokens += count;
    sum.total_nll += total;
    std::string s = fmt::format("{{\"index\": {}, \"loss\": ", indices[static_cast<size_t>(i)]);
    if (count > 0) write_number(s, total / static_cast<double>(count));
    else s += "null";
    fmt::format_to(std::back_inserter(s), ", \"tokens\": {}", count);
    if (o.logprobs) {
      s += ", \"logprobs\": [";
      for (int64_t j = 0; j + 1 < t; ++j) {
        if (j) s += ", ";
        const size_t k = static_cast<size_t>(i * (t - 1) + j);
        if (targets[k] == -100) s += "null";
        else write_number(s, -nll[k]);
      }
      s += "]";
    }
    if (o.logits) {
      s += ", \"logits\": [";
      for (int64_t j = 0; j < t; ++j) {
        s += j ? ", [" : "[";
        const float* row = logits.data() + static_cast<size_t>((i * t + j) * v);
        for (int64_t c = 0; c < v; ++c) {
          if (c) s += ", ";
          write_number(s, row[c]);
        }
        s += "]";
      }
      s += "]";
    }
    s += "}";
    lines.push_back(std::move(s));
  }
  return lines;
}

}  // namespace

double EvalSummary::mean_loss() const { return tokens > 0 ? total_nll / static_cast<double>(tokens) : NAN; }
double EvalSummary::perplexity() const { return std::exp(mean_loss()); }

int64_t count_scored_targets(const std::vector<EvalSequence>& seqs) {
  int64_t n = 0;
  for (const EvalSequence& s : seqs)
    for (size_t t = 1; t < s.labels.size(); ++t) n += s.labels[t] != -100;
  return n;
}

std::vector<EvalSequence> read_eval_file(const std::string& path, int64_t vocab_size) {
  std::ifstream in(path);
  KILN_CHECK(in.good(), "eval", "cannot open '{}'", path);
  std::vector<EvalSequence> seqs;
  std::string text;
  for (int64_t line = 1; std::getline(in, text); ++line) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, line);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      KILN_FAIL("eval", "{}: not valid JSON ({})", where, e.what());
    }
    EvalSequence s;
    s.line = line;
    if (j.is_array()) {
      s.input_ids = read_ids(j, "ids", false, vocab_size, where);
      s.labels = s.input_ids;
    } else {
      KILN_CHECK(j.is_object(), "eval", "{}: expected an array of token ids or an object with \"input_ids\", found {}",
                 where, j.type_name());
      for (const auto& [key, value] : j.items())
        KILN_CHECK(key == "input_ids" || key == "labels", "eval",
                   "{}: unexpected key \"{}\" (only \"input_ids\" and \"labels\")", where, key);
      KILN_CHECK(j.contains("input_ids"), "eval", "{}: the object has no \"input_ids\"", where);
      s.input_ids = read_ids(j["input_ids"], "input_ids", false, vocab_size, where);
      if (j.contains("labels")) {
        s.labels = read_ids(j["labels"], "labels", true, vocab_size, where);
        KILN_CHECK(s.labels.size() == s.input_ids.size(), "eval", "{}: {} labels for {} input_ids", where,
                   s.labels.size(), s.input_ids.size());
      } else {
        s.labels = s.input_ids;
      }
    }
    seqs.push_back(std::move(s));
  }
  KILN_CHECK(!in.bad(), "eval", "error reading '{}'", path);
  return seqs;
}

EvalSummary evaluate(nn::Llama& model, const std::vector<EvalSequence>& seqs, const EvalOptions& o, std::ostream& out) {
  KILN_CHECK(o.batch_size > 0, "eval", "batch size must be > 0, found {}", o.batch_size);
  const bool was_training = model.is_training();
  model.eval();
  autograd::NoGradGuard no_grad;
  std::map<size_t, std::vector<int64_t>> by_length;  // length -> indices, in file order
  for (size_t i = 0; i < seqs.size(); ++i) {
    KILN_CHECK(!seqs[i].input_ids.empty() && seqs[i].labels.size() == seqs[i].input_ids.size(), "eval",
               "sequence {} has {} ids and {} labels (expected as many, at least one)", i, seqs[i].input_ids.size(),
               seqs[i].labels.size());
    by_length[seqs[i].input_ids.size()].push_back(static_cast<int64_t>(i));
  }
  EvalSummary sum;
  std::vector<std::string> lines(seqs.size());
  try {
    for (const auto& [length, indices] : by_length) {
      for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(o.batch_size)) {
        const size_t end = std::min(indices.size(), start + static_cast<size_t>(o.batch_size));
        std::vector<int64_t> chunk(indices.begin() + static_cast<std::ptrdiff_t>(start),
                                   indices.begin() + static_cast<std::ptrdiff_t>(end));
        std::vector<const EvalSequence*> batch;
        for (int64_t i : chunk) batch.push_back(&seqs[static_cast<size_t>(i)]);
        auto scored = score_batch(model, batch, chunk, o, sum);
        for (size_t k = 0; k < chunk.size(); ++k) lines[static_cast<size_t>(chunk[k])] = std::move(scored[k]);
      }
    }
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);
  for (const std::string& line : lines) out << line << '\n';
  out.flush();
  return sum;
}

EvalSummary run_eval(const EvalCommand& c) {
  const auto t0 = std::chrono::steady_clock::now();
  KILN_CHECK(!c.model.model_dir.empty() || !c.model.config.empty(), "kiln", "give --model DIR or --config NAME");
  // the file is checked against the config's vocabulary before the (possibly large) model loads
  const nn::LlamaConfig config = c.model.model_dir.empty()
                                     ? nn::LlamaConfig::named(c.model.config)
                                     : nn::LlamaConfig::from_file(c.model.model_dir + "/config.json");
  const std::vector<EvalSequence> seqs = read_eval_file(c.ids, config.vocab_size);
  KILN_CHECK(!seqs.empty(), "eval", "{} holds no sequences (expected one JSON array of token ids per line)", c.ids);
  KILN_CHECK(count_scored_targets(seqs) > 0, "eval",
             "{}: no token to score: each token is scored from the ones before it, so a sequence needs at least 2 "
             "tokens (with a label other than -100 after the first); found {} sequence(s) of at most {} token(s)",
             c.ids, seqs.size(),
             std::max_element(seqs.begin(), seqs.end(), [](const EvalSequence& a, const EvalSequence& b) {
               return a.input_ids.size() < b.input_ids.size();
             })->input_ids.size());
  std::vector<std::string> warnings;
  size_t too_long = 0, longest = 0;
  for (const EvalSequence& s : seqs) {
    too_long += static_cast<int64_t>(s.input_ids.size()) > config.max_position_embeddings;
    longest = std::max(longest, s.input_ids.size());
  }
  if (too_long > 0)
    warnings.push_back(fmt::format("{} sequence(s) are longer than the model's max_position_embeddings of {} (the longest "
                                   "has {} tokens): their losses past it are unreliable",
                                   too_long, config.max_position_embeddings, longest));
  for (const std::string& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  std::shared_ptr<nn::Llama> model = load_model(c.model);
  EvalSummary sum;
  if (c.output.empty()) {
    sum = evaluate(*model, seqs, c.options, std::cout);
  } else {
    std::ofstream out(c.output);
    KILN_CHECK(out.good(), "eval", "cannot write '{}'", c.output);
    sum = evaluate(*model, seqs, c.options, out);
    KILN_CHECK(out.good(), "eval", "error writing '{}'", c.output);
  }
  sum.warnings = std::move(warnings);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "eval: %lld sequences, %lld scored tokens, mean loss %.6f, perplexity %.4f (%.1f s)\n",
               static_cast<long long>(sum.sequences), static_cast<long long>(sum.tokens), sum.mean_loss(),
               sum.perplexity(), secs);
  return sum;
}

void add_eval_command(CLI::App& app) {
  auto c = std::make_shared<EvalCommand>();
  CLI::App* cmd = app.add_subcommand("eval", "loss / perplexity (and log-probabilities, logits) of token-id sequences");
  add_model_options(*cmd, c->model);
  cmd->add_option("--ids", c->ids, "JSONL: per line an array of token ids or {\"input_ids\": [...], \"labels\": [...]}")
      ->required();
  cmd->add_option("--batch-size", c->options.batch_size, "sequences of one length scored together")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--logprobs", c->options.logprobs, "add the log-probability of each next token");
  cmd->add_flag("--logits", c->options.logits, "add the full (T, V) f32 logits");
  cmd->add_option("--output", c->output, "write the JSONL here instead of stdout");
  cmd->callback([cmd, c] {
    for (const std::string& w : apply_adapter_base(c->model, nullptr, given_model_options(*cmd)))
      std::fprintf(stderr, "warning: %s\n", w.c_str());
    run_eval(*c);
  });
}

}  // namespace kiln::app

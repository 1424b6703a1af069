// `kiln eval`'s library half: reading token-id JSONL files, scoring each sequence with a Llama
// (Hugging Face's causal-LM loss: logits[t] against labels[t+1]), and the JSONL it writes.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "examples/kiln/app.h"

namespace kiln::app {

struct EvalSequence {
  std::vector<int64_t> input_ids;  // (T)
  std::vector<int64_t> labels;     // (T), -100 = not scored; the ids themselves unless given
  int64_t line = 0;                // 1-based line in the file
};

// One sequence per line: a JSON array of ids, or {"input_ids": [...], "labels": [...]} (labels
// optional). Blank lines are skipped. Ids must lie in [0, vocab_size), labels too or be -100.
// Errors name file:line.
std::vector<EvalSequence> read_eval_file(const std::string& path, int64_t vocab_size);

struct EvalOptions {
  int64_t batch_size = 8;  // sequences of one length scored together
  bool logprobs = false;   // per target: log p(labels[t+1] | ids[..t]), null where ignored
  bool logits = false;     // the full (T, V) f32 logits
};

struct EvalSummary {
  int64_t sequences = 0;
  int64_t tokens = 0;      // scored targets over all sequences
  double total_nll = 0;    // summed cross-entropy over all scored targets
  std::vector<std::string> warnings;  // run_eval: also printed on stderr ("warning: ...")
  // NaN when no token was scored (run_eval refuses such files before scoring).
  double mean_loss() const;
  double perplexity() const;
};

// The targets a loss is computed over (labels[t] != -100 for t >= 1), summed over `seqs`.
int64_t count_scored_targets(const std::vector<EvalSequence>& seqs);

// Scores `seqs` (eval mode, no gradients, on the model's device) and writes one JSON object per
// sequence in input order: {"index", "loss" (null without targets), "tokens"[, "logprobs"][, "logits"]}.
EvalSummary evaluate(nn::Llama& model, const std::vector<EvalSequence>& seqs, const EvalOptions& o, std::ostream& out);

// The whole command: model (+ adapter) from `model`, ids from `ids`, JSONL to `output` (stdout when
// empty), the summary line on stderr. A file without sequences, or without a token to score (every
// sequence 1 token long, or labels all -100), is an error; sequences longer than the model's
// max_position_embeddings are a warning.
struct EvalCommand {
  ModelSpec model;
  std::string ids;
  std::string output;
  EvalOptions options;
};
EvalSummary run_eval(const EvalCommand& c);

}  // namespace kiln::app

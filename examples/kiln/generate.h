// `kiln generate`'s library half: the prompt's ids (plain or Llama 3 chat), streaming decoded text
// without splitting multi-byte UTF-8 characters, and the command as a function the tests can call.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "examples/kiln/app.h"
#include "nn/generate.h"

namespace kiln::app {

// Removes and returns the longest prefix of `pending` that does not end inside a UTF-8 sequence
// (an incomplete lead byte and its continuation bytes stay for the next token's bytes).
std::string take_complete_utf8(std::string& pending);

struct GenerateCommand {
  ModelSpec model;
  std::string tokenizer;
  std::string prompt;
  bool chat = false;       // render a user message (after an optional system one) + the assistant header
  std::string system;
  nn::GenerateOptions options;  // stop tokens: filled from the config's eos ids and <|eot_id|>
};

// bos + the prompt's ids, or the chat rendering (which starts with bos).
std::vector<int64_t> prompt_ids(const data::Tokenizer& tok, const GenerateCommand& c);
// The config's eos ids and the tokenizer's <|eot_id|> (those inside the vocabulary).
std::vector<int64_t> stop_tokens(const nn::LlamaConfig& config, const data::Tokenizer& tok);

struct GenerateResult {
  std::vector<int64_t> tokens;  // the new tokens (a final stop token included)
  std::string text;             // what was written to `out` (stop tokens not printed)
  double seconds = 0;
};
// Generates and streams the text to `out` (flushed per piece, then a newline).
GenerateResult run_generate(nn::Llama& model, const data::Tokenizer& tok, const GenerateCommand& c, std::ostream& out);

}  // namespace kiln::app

// `kiln generate`'s library half: the prompt's ids (plain or Llama 3 chat), streaming decoded text as
// valid UTF-8 (a character split across tokens held back until complete, invalid bytes as U+FFFD, special
// tokens not printed), and the command as a function the tests can call.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "examples/kiln/app.h"
#include "nn/generate.h"

namespace kiln::app {

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
  std::string text;             // what was written to `out`: valid UTF-8, special tokens not printed
  std::vector<std::string> warnings;  // also printed on stderr ("warning: ...")
  double seconds = 0;
};
// The text of generated tokens as `kiln generate` prints it: special tokens (stop tokens, reserved ones)
// and ids past the tokenizer left out, bytes as valid UTF-8 (data::to_valid_utf8).
std::string printable_text(const data::Tokenizer& tok, const std::vector<int64_t>& tokens);
// Generates and streams the text to `out` (flushed per piece, then a newline). A prompt plus
// max_new_tokens past the model's max_position_embeddings is a warning (RoPE positions it never saw).
GenerateResult run_generate(nn::Llama& model, const data::Tokenizer& tok, const GenerateCommand& c, std::ostream& out);

}  // namespace kiln::app

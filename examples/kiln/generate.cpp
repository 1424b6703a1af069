// `kiln generate`: continues a prompt (plain, or Llama 3 chat) with a KV cache, streaming the decoded
// text to stdout as tokens arrive (valid UTF-8, no special tokens), and reports tokens/s on stderr.
#include "examples/kiln/generate.h"

#include <algorithm>
#include <chrono>
#include <fmt/format.h>
#include <cstdio>
#include <iostream>
#include <memory>

#include "core/error.h"
#include "data/utf8.h"
#include "examples/kiln/adapter_base.h"

namespace kiln::app {

std::string printable_text(const data::Tokenizer& tok, const std::vector<int64_t>& tokens) {
  std::vector<int32_t> ids;
  for (int64_t t : tokens)
    if (t >= 0 && t < tok.vocab_size() && !tok.is_special(static_cast<int32_t>(t))) ids.push_back(static_cast<int32_t>(t));
  return data::to_valid_utf8(tok.decode(ids));
}

std::vector<int64_t> prompt_ids(const data::Tokenizer& tok, const GenerateCommand& c) {
  std::vector<int32_t> ids;
  if (c.chat) {
    std::vector<data::ChatMessage> messages;
    if (!c.system.empty()) messages.push_back({"system", c.system});
    messages.push_back({"user", c.prompt});
    ids = tok.encode_chat(messages, true);
  } else {
    KILN_CHECK(c.system.empty(), "generate", "--system needs --chat");
    ids = tok.encode(c.prompt, true);
  }
  return {ids.begin(), ids.end()};
}

std::vector<int64_t> stop_tokens(const nn::LlamaConfig& config, const data::Tokenizer& tok) {
  std::vector<int64_t> stop;
  auto add = [&](int64_t id) {
    if (id >= 0 && id < config.vocab_size && std::find(stop.begin(), stop.end(), id) == stop.end()) stop.push_back(id);
  };
  for (int64_t id : config.eos_token_ids) add(id);
  add(tok.eot_id());
  return stop;
}

GenerateResult run_generate(nn::Llama& model, const data::Tokenizer& tok, const GenerateCommand& c, std::ostream& out) {
  const std::vector<int64_t> prompt = prompt_ids(tok, c);
  nn::GenerateOptions o = c.options;
  o.token_limit = tok.vocab_size();  // never draw an id the tokenizer cannot print
  for (int64_t id : stop_tokens(model.config(), tok))
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), id) == o.stop_tokens.end()) o.stop_tokens.push_back(id);
  GenerateResult r;
  const int64_t positions = static_cast<int64_t>(prompt.size()) + o.max_new_tokens;
  if (positions > model.config().max_position_embeddings)
    r.warnings.push_back(fmt::format(
        "the prompt ({} tokens) plus --max-new-tokens {} reach position {}, past the model's max_position_embeddings "
        "of {}: the text after that is unreliable",
        prompt.size(), o.max_new_tokens, positions, model.config().max_position_embeddings));
  for (const std::string& w : r.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  data::Utf8Stream stream;  // holds an unfinished UTF-8 character until its last byte arrives
  const auto t0 = std::chrono::steady_clock::now();
  auto first = t0;
  r.tokens = nn::generate(model, prompt, o, [&](int64_t token) {
    if (r.tokens.empty()) first = std::chrono::steady_clock::now();
    r.tokens.push_back(token);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end()) return true;
    if (token >= tok.vocab_size()) return true;  // a model vocabulary padded past the tokenizer's
    const int32_t id = static_cast<int32_t>(token);
    if (tok.is_special(id)) return true;  // reserved and header tokens are not text
    const std::string piece = stream.push(tok.id_to_bytes(id));
    if (!piece.empty()) {
      out << piece << std::flush;
      r.text += piece;
    }
    return true;
  });
  const std::string tail = stream.finish();  // an unfinished character at the end: U+FFFD
  out << tail << '\n' << std::flush;
  r.text += tail;
  const auto t1 = std::chrono::steady_clock::now();
  r.seconds = std::chrono::duration<double>(t1 - t0).count();
  const double prefill = std::chrono::duration<double>(first - t0).count();
  const double decode = std::chrono::duration<double>(t1 - first).count();
  const auto n = static_cast<double>(r.tokens.size());
  std::fprintf(stderr,
               "generate: %zu prompt tokens, %zu new tokens in %.2f s (first token after %.3f s; %.1f tokens/s after it, "
               "%.1f tokens/s overall)\n",
               prompt.size(), r.tokens.size(), r.seconds, prefill, n > 1 && decode > 0 ? (n - 1) / decode : 0.0,
               r.seconds > 0 ? n / r.seconds : 0.0);
  return r;
}

void add_generate_command(CLI::App& app) {
  auto c = std::make_shared<GenerateCommand>();
  CLI::App* cmd = app.add_subcommand("generate", "continue a prompt with a (fine-tuned) model, streaming the text");
  add_model_options(*cmd, c->model);
  cmd->add_option("--tokenizer", c->tokenizer, "tokenizer.json or a folder holding one (default: the model's, else kiln's)");
  cmd->add_option("--prompt", c->prompt, "the text to continue (or the user message with --chat)")->required();
  auto* chat = cmd->add_flag("--chat", c->chat, "render the prompt as a Llama 3 chat user turn + the assistant header");
  cmd->add_option("--system", c->system, "a system message before the user turn")->needs(chat);
  cmd->add_option("--max-new-tokens", c->options.max_new_tokens, "at most this many new tokens")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", c->options.temperature, "0: greedy; > 0: sample from softmax(logits / T)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", c->options.top_p, "nucleus sampling: keep the most likely tokens up to this mass")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--top-k", c->options.top_k, "keep only the k most likely tokens (0: off)")->check(CLI::NonNegativeNumber);
  cmd->callback([cmd, c] {
    c->options.seed = c->model.seed;  // the user's seed (or 0) for sampling; a recorded random base keeps its own
    for (const std::string& w : apply_adapter_base(c->model, &c->tokenizer, given_model_options(*cmd)))
      std::fprintf(stderr, "warning: %s\n", w.c_str());
    const data::Tokenizer tok = load_tokenizer(c->tokenizer, c->model.model_dir);
    std::shared_ptr<nn::Llama> model = load_model(c->model);
    run_generate(*model, tok, *c, std::cout);
  });
}

}  // namespace kiln::app

// `kiln generate`: continues a prompt (plain, or Llama 3 chat) with a KV cache, streaming the decoded
// text to stdout as tokens arrive, and reports tokens/s on stderr.
#include "examples/kiln/generate.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>

#include "core/error.h"

namespace kiln::app {

namespace {

// The length of the UTF-8 sequence a lead byte starts (1 for ASCII and for invalid bytes).
size_t utf8_length(unsigned char c) {
  if (c >= 0xC0 && c < 0xE0) return 2;
  if (c >= 0xE0 && c < 0xF0) return 3;
  if (c >= 0xF0 && c < 0xF8) return 4;
  return 1;
}

}  // namespace

std::string take_complete_utf8(std::string& pending) {
  const size_t n = pending.size();
  size_t cut = n;
  // look back over at most 3 continuation bytes for the last lead byte
  for (size_t back = 1; back <= std::min<size_t>(n, 4); ++back) {
    const auto c = static_cast<unsigned char>(pending[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    if (utf8_length(c) > back) cut = n - back;  // its sequence is not complete yet
    break;
  }
  std::string done = pending.substr(0, cut);
  pending.erase(0, cut);
  return done;
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
  std::string pending;  // bytes of an unfinished UTF-8 character
  const auto t0 = std::chrono::steady_clock::now();
  auto first = t0;
  r.tokens = nn::generate(model, prompt, o, [&](int64_t token) {
    if (r.tokens.empty()) first = std::chrono::steady_clock::now();
    r.tokens.push_back(token);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end()) return true;
    if (token >= tok.vocab_size()) return true;  // a model vocabulary padded past the tokenizer's
    const int32_t id = static_cast<int32_t>(token);
    pending += tok.decode(std::span<const int32_t>(&id, 1));
    const std::string piece = take_complete_utf8(pending);
    if (!piece.empty()) {
      out << piece << std::flush;
      r.text += piece;
    }
    return true;
  });
  out << pending << '\n' << std::flush;
  r.text += pending;
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
  cmd->callback([c] {
    c->options.seed = c->model.seed;
    const data::Tokenizer tok = load_tokenizer(c->tokenizer, c->model.model_dir);
    std::shared_ptr<nn::Llama> model = load_model(c->model);
    run_generate(*model, tok, *c, std::cout);
  });
}

}  // namespace kiln::app

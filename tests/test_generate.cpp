// Generation (nn/generate.h, `kiln generate`): greedy with the KV cache against argmax over full
// forwards, seeded temperature/top-k/top-p sampling checked against probabilities computed here,
// stop tokens, the callback, max_new_tokens, errors, and streaming UTF-8 text.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "data/utf8.h"
#include "examples/kiln/generate.h"
#include "nn/generate.h"
#include "nn/llama.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

nn::LlamaConfig small_config(bool tied) {
  nn::LlamaConfig c;
  c.vocab_size = 41;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rope_theta = 10000;
  c.rope_scaling = nn::RopeScaling{4.0, 1.0, 4.0, 8};
  c.tie_word_embeddings = tied;
  return c;
}

// A random f64 Llama whose logits are spread out (the output projection scaled by `sharpness`),
// so that greedy and nucleus choices are far from ties.
std::shared_ptr<nn::Llama> small_model(bool tied, uint64_t seed, double sharpness) {
  nn::LlamaOptions o;
  o.dtype = DType::f64;
  o.seed = seed;
  auto m = std::make_shared<nn::Llama>(small_config(tied), o);
  autograd::NoGradGuard g;
  Tensor w = m->lm_head_weight();
  copy_(w, mul(w, sharpness));
  return m;
}

// (V) f64 logits of the last position, from a full forward over `ids` without a cache.
std::vector<double> full_logits(nn::Llama& m, const std::vector<int64_t>& ids) {
  autograd::NoGradGuard g;
  const int64_t t = static_cast<int64_t>(ids.size());
  Tensor h = m.forward(from_vector<int64_t>(ids, {1, t}));
  return reshape(m.logits(narrow(h, 1, t - 1, 1)), {-1}).to_vector<double>();
}

int64_t argmax_of(const std::vector<double>& v) { return std::max_element(v.begin(), v.end()) - v.begin(); }

// Greedy continuation by repeated full forwards.
std::vector<int64_t> greedy_reference(nn::Llama& m, std::vector<int64_t> ids, int64_t n) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(argmax_of(full_logits(m, ids)));
    ids.push_back(out.back());
  }
  return out;
}

// The nucleus of softmax(logits / temperature) restricted to the top_k best: ids whose mass,
// summed from the most likely, reaches top_p.
std::vector<int64_t> nucleus(const std::vector<double>& logits, double temperature, double top_p, int64_t top_k) {
  std::vector<int64_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  if (top_k > 0) ids.resize(static_cast<size_t>(top_k));
  std::vector<double> p;
  double z = 0;
  for (int64_t id : ids) z += p.emplace_back(std::exp((logits[id] - logits[ids[0]]) / temperature));
  double mass = 0;
  size_t n = 0;
  while (n < ids.size() && mass < top_p) mass += p[n++] / z;
  ids.resize(std::max<size_t>(n, 1));
  return ids;
}

std::vector<float> random_logits(int64_t v, uint64_t seed, double scale) {
  return mul(test::random_tensor({v}, DType::f32, seed), scale).to_vector<float>();
}

}  // namespace

TEST_CASE("generate: greedy decoding with the KV cache equals argmax over full forwards", "[generate]") {
  for (bool tied : {true, false}) {
    auto m = small_model(tied, 11, 20.0);
    m->train();
    for (const std::vector<int64_t>& prompt : {std::vector<int64_t>{3}, std::vector<int64_t>{5, 17, 2, 40, 9, 0, 33}}) {
      INFO("tied " << tied << ", prompt of " << prompt.size());
      nn::GenerateOptions o;
      o.max_new_tokens = 13;
      const auto got = nn::generate(*m, prompt, o);
      REQUIRE(got == greedy_reference(*m, prompt, 13));
      REQUIRE(m->is_training());  // the mode is restored
      // greedy ignores the seed and top_p / top_k
      o.seed = 99;
      o.top_p = 0.3;
      o.top_k = 2;
      REQUIRE(nn::generate(*m, prompt, o) == got);
    }
  }
}

TEST_CASE("generate: temperature sampling is deterministic for a seed and differs across seeds", "[generate]") {
  auto m = small_model(false, 12, 1.0);
  const std::vector<int64_t> prompt{1, 2, 3};
  nn::GenerateOptions o;
  o.max_new_tokens = 24;
  o.temperature = 1.3;
  o.seed = 5;
  const auto a = nn::generate(*m, prompt, o);
  REQUIRE(a.size() == 24);
  REQUIRE(nn::generate(*m, prompt, o) == a);
  o.seed = 6;
  const auto b = nn::generate(*m, prompt, o);
  REQUIRE(b != a);
  REQUIRE(b != greedy_reference(*m, prompt, 24));
  o.top_k = 4;  // deterministic through the sorted path too
  REQUIRE(nn::generate(*m, prompt, o) == nn::generate(*m, prompt, o));
}

TEST_CASE("generate: top_p -> 0 is greedy", "[generate]") {
  auto m = small_model(true, 13, 5.0);
  const std::vector<int64_t> prompt{7, 8, 9, 10};
  nn::GenerateOptions o;
  o.max_new_tokens = 16;
  o.temperature = 2.0;
  o.top_p = 1e-9;
  for (uint64_t seed : {1, 2, 3}) {
    o.seed = seed;
    REQUIRE(nn::generate(*m, prompt, o) == greedy_reference(*m, prompt, 16));
  }
  o.top_p = 1.0;
  o.top_k = 1;  // top_k = 1 is greedy too
  REQUIRE(nn::generate(*m, prompt, o) == greedy_reference(*m, prompt, 16));
}

TEST_CASE("generate: sampled tokens lie inside the nucleus and the top k", "[generate]") {
  auto m = small_model(false, 14, 8.0);
  const std::vector<int64_t> prompt{4, 20, 31};
  struct Case {
    double temperature, top_p;
    int64_t top_k;
  };
  for (const Case c : {Case{1.0, 0.6, 0}, Case{0.7, 0.9, 0}, Case{1.5, 1.0, 3}, Case{1.2, 0.8, 5}}) {
    std::vector<int64_t> all;
    for (uint64_t seed = 0; seed < 6; ++seed) {
      nn::GenerateOptions o;
      o.max_new_tokens = 10;
      o.temperature = c.temperature;
      o.top_p = c.top_p;
      o.top_k = c.top_k;
      o.seed = seed;
      const auto got = nn::generate(*m, prompt, o);
      REQUIRE(got.size() == 10);
      std::vector<int64_t> ids = prompt;
      for (int64_t token : got) {
        const auto allowed = nucleus(full_logits(*m, ids), c.temperature, c.top_p, c.top_k);
        INFO("T " << c.temperature << " top_p " << c.top_p << " top_k " << c.top_k << ": token " << token << " of "
                  << allowed.size() << " allowed");
        REQUIRE(std::find(allowed.begin(), allowed.end(), token) != allowed.end());
        ids.push_back(token);
        all.push_back(token);
      }
    }
    // the draws are not all the top token
    REQUIRE(std::count(all.begin(), all.end(), all[0]) < static_cast<int64_t>(all.size()));
  }
}

TEST_CASE("generate: sample_token draws the renormalised nucleus distribution", "[generate]") {
  const std::vector<float> logits = random_logits(50, 3, 1.5);  // (V)
  std::vector<double> ld(logits.begin(), logits.end());
  nn::GenerateOptions o;
  o.temperature = 0.8;
  o.top_p = 0.7;
  o.top_k = 20;
  const auto allowed = nucleus(ld, o.temperature, o.top_p, o.top_k);
  const nn::Candidates c = nn::sampling_candidates(logits, o);
  REQUIRE(c.ids == allowed);
  // probabilities computed here: softmax over the allowed ids
  std::vector<double> want;
  double z = 0;
  for (int64_t id : allowed) z += want.emplace_back(std::exp(ld[id] / o.temperature));
  for (size_t i = 0; i < want.size(); ++i) REQUIRE(std::abs(c.probs[i] - want[i] / z) < 1e-12);

  Generator gen(17);
  const int n = 20000;
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < n; ++i) counts[static_cast<size_t>(nn::sample_token(logits, o, gen))]++;
  for (size_t id = 0; id < counts.size(); ++id) {
    const auto pos = std::find(allowed.begin(), allowed.end(), static_cast<int64_t>(id));
    if (pos == allowed.end()) {
      REQUIRE(counts[id] == 0);
      continue;
    }
    const double p = want[static_cast<size_t>(pos - allowed.begin())] / z;
    INFO("id " << id << ": " << counts[id] << " draws, expected " << p * n);
    REQUIRE(std::abs(counts[id] - p * n) <= 5 * std::sqrt(n * p * (1 - p)) + 1);
  }
  // plain temperature sampling (no sort) draws softmax(logits / T) too
  o.top_p = 1.0;
  o.top_k = 0;
  std::fill(counts.begin(), counts.end(), 0);
  for (int i = 0; i < n; ++i) counts[static_cast<size_t>(nn::sample_token(logits, o, gen))]++;
  z = 0;
  for (double l : ld) z += std::exp(l / o.temperature);
  for (size_t id = 0; id < counts.size(); ++id) {
    const double p = std::exp(ld[id] / o.temperature) / z;
    REQUIRE(std::abs(counts[id] - p * n) <= 5 * std::sqrt(n * p * (1 - p)) + 1);
  }
  o.temperature = 0;  // greedy: the first maximum
  REQUIRE(nn::sample_token(logits, o, gen) == argmax_of(ld));
}

TEST_CASE("generate: stop tokens, the callback and max_new_tokens end generation", "[generate]") {
  auto m = small_model(false, 15, 8.0);
  const std::vector<int64_t> prompt{2, 3, 5, 7};
  const auto free_run = greedy_reference(*m, prompt, 12);
  // the last position whose token did not occur before it: stopping on that token stops there
  size_t k = 0;
  for (size_t i = 1; i < free_run.size(); ++i)
    if (std::find(free_run.begin(), free_run.begin() + static_cast<std::ptrdiff_t>(i), free_run[i]) ==
        free_run.begin() + static_cast<std::ptrdiff_t>(i))
      k = i;
  INFO("stop at " << k);
  REQUIRE(k >= 2);
  nn::GenerateOptions o;
  o.max_new_tokens = 12;
  o.stop_tokens = {free_run[k], 40};
  std::vector<int64_t> seen;
  const auto got = nn::generate(*m, prompt, o, [&](int64_t t) {
    seen.push_back(t);
    return true;
  });
  REQUIRE(got == std::vector<int64_t>(free_run.begin(), free_run.begin() + static_cast<std::ptrdiff_t>(k) + 1));
  REQUIRE(seen == got);
  // the callback stops after the token it returns false for
  o.stop_tokens.clear();
  int calls = 0;
  const auto cut = nn::generate(*m, prompt, o, [&](int64_t) { return ++calls < 3; });
  REQUIRE(cut == std::vector<int64_t>(free_run.begin(), free_run.begin() + 3));
  // max_new_tokens
  for (int64_t n : {0, 1, 5}) {
    o.max_new_tokens = n;
    REQUIRE(nn::generate(*m, prompt, o) == std::vector<int64_t>(free_run.begin(), free_run.begin() + n));
  }
}

TEST_CASE("generate: bad prompts and options are errors", "[generate]") {
  auto m = small_model(true, 16, 1.0);
  nn::GenerateOptions o;
  REQUIRE_THROWS_WITH(nn::generate(*m, {}, o), ContainsSubstring("[generate]") && ContainsSubstring("empty"));
  REQUIRE_THROWS_WITH(nn::generate(*m, {1, 41}, o), ContainsSubstring("[generate]") && ContainsSubstring("41"));
  REQUIRE_THROWS_WITH(nn::generate(*m, {1, -1}, o), ContainsSubstring("[generate]"));
  o.temperature = -1;
  REQUIRE_THROWS_WITH(nn::generate(*m, {1}, o), ContainsSubstring("[generate]") && ContainsSubstring("temperature"));
  o.temperature = 1;
  o.top_p = 1.5;
  REQUIRE_THROWS_WITH(nn::generate(*m, {1}, o), ContainsSubstring("[generate]") && ContainsSubstring("top_p"));
  o.top_p = 1;
  o.top_k = -2;
  REQUIRE_THROWS_WITH(nn::generate(*m, {1}, o), ContainsSubstring("[generate]") && ContainsSubstring("top_k"));
  o.top_k = 0;
  o.max_new_tokens = -1;
  REQUIRE_THROWS_WITH(nn::generate(*m, {1}, o), ContainsSubstring("[generate]"));
  Generator gen(0);
  o.max_new_tokens = 4;
  REQUIRE_THROWS_WITH(nn::sample_token({0.5f, NAN, 1.0f}, o, gen), ContainsSubstring("NaN"));
}

TEST_CASE("generate: the stream is valid UTF-8, holds split characters back and prints no special tokens", "[generate]") {
  // A random 4,096-id model sampled at a high temperature draws byte tokens that are parts of UTF-8
  // characters (alone: invalid) and reserved special tokens: neither may reach the text.
  const data::Tokenizer tok = app::load_tokenizer("", "");
  app::GenerateCommand c;
  c.model.config = "tiny";
  c.model.device = "cpu";
  auto model = app::load_model(c.model);
  c.prompt = "And";
  c.options.max_new_tokens = 48;
  c.options.temperature = 3.0;
  bool saw_special = false, saw_invalid_bytes = false;
  for (uint64_t seed = 0; seed < 6; ++seed) {
    c.options.seed = seed;
    std::ostringstream out;
    const app::GenerateResult r = app::run_generate(*model, tok, c, out);
    CAPTURE(seed, r.text);
    REQUIRE(data::find_invalid_utf8(out.str()) == std::string::npos);
    REQUIRE(out.str() == r.text + "\n");
    REQUIRE(r.text == app::printable_text(tok, r.tokens));
    REQUIRE(r.text.find("<|") == std::string::npos);
    std::vector<int32_t> plain;
    for (int64_t t : r.tokens) {
      if (tok.is_special(static_cast<int32_t>(t))) saw_special = true;
      else plain.push_back(static_cast<int32_t>(t));
    }
    if (data::find_invalid_utf8(tok.decode(plain)) != std::string::npos) saw_invalid_bytes = true;
  }
  REQUIRE(saw_special);        // the draws did include special tokens ...
  REQUIRE(saw_invalid_bytes);  // ... and bytes that are not valid UTF-8 on their own

  // a character split over two tokens comes out whole; a cut-off one at the end becomes U+FFFD
  const int32_t e2 = tok.token_to_id(data::byte_to_unicode(0xE2));
  const int32_t x82 = tok.token_to_id(data::byte_to_unicode(0x82));
  const int32_t xac = tok.token_to_id(data::byte_to_unicode(0xAC));
  REQUIRE((e2 >= 0 && x82 >= 0 && xac >= 0));
  REQUIRE(app::printable_text(tok, {e2, x82, xac, 3842}) == "\xe2\x82\xac");  // the euro sign; 3842 is reserved
  REQUIRE(app::printable_text(tok, {e2, x82}) == std::string(data::kReplacementCharacter));
}

TEST_CASE("generate: past max_position_embeddings is a warning", "[generate]") {
  const data::Tokenizer tok = app::load_tokenizer("", "");
  app::GenerateCommand c;
  c.model.config = "tiny";
  c.model.device = "cpu";
  auto model = app::load_model(c.model);
  c.prompt = "And God said";
  c.options.max_new_tokens = 2;
  std::ostringstream out;
  REQUIRE(app::run_generate(*model, tok, c, out).warnings.empty());
  // the same model with a limit of 4 positions: the prompt alone passes it
  nn::LlamaConfig small = model->config();
  small.max_position_embeddings = 4;
  nn::LlamaOptions lo;
  lo.device = kCPU;
  auto short_model = std::make_shared<nn::Llama>(small, lo);
  c.options.max_new_tokens = 3;
  const app::GenerateResult r = app::run_generate(*short_model, tok, c, out);
  REQUIRE(r.warnings.size() == 1);
  const size_t reach = app::prompt_ids(tok, c).size() + 3;
  CHECK_THAT(r.warnings[0], ContainsSubstring("max_position_embeddings of 4") &&
                                ContainsSubstring(fmt::format("reach position {}", reach)));
}

TEST_CASE("generate: the command streams the decoded text of the generated tokens", "[generate]") {
  const data::Tokenizer tok = app::load_tokenizer("", "");
  app::GenerateCommand c;
  c.model.config = "tiny";
  c.model.device = "cpu";
  c.model.seed = 4;
  c.options.max_new_tokens = 12;
  c.options.temperature = 1.0;
  c.options.seed = 4;
  auto model = app::load_model(c.model);
  for (bool chat : {false, true}) {
    c.chat = chat;
    c.prompt = "In the beginning, caf\xc3\xa9 \xf0\x9f\x98\x80";
    c.system = chat ? "Answer briefly." : "";
    const std::vector<int64_t> ids = app::prompt_ids(tok, c);
    REQUIRE(ids[0] == tok.bos_id());
    if (chat) {
      std::vector<data::ChatMessage> msgs{{"system", c.system}, {"user", c.prompt}};
      const auto want = tok.encode_chat(msgs, true);
      REQUIRE(ids == std::vector<int64_t>(want.begin(), want.end()));
    }
    const auto stops = app::stop_tokens(model->config(), tok);
    REQUIRE(!model->config().eos_token_ids.empty());
    for (int64_t id : model->config().eos_token_ids) REQUIRE(std::find(stops.begin(), stops.end(), id) != stops.end());
    REQUIRE(std::find(stops.begin(), stops.end(), tok.eot_id()) != stops.end());
    std::ostringstream out;
    const app::GenerateResult r = app::run_generate(*model, tok, c, out);
    nn::GenerateOptions o = c.options;
    o.stop_tokens = stops;
    REQUIRE(r.tokens == nn::generate(*model, ids, o));
    REQUIRE(r.text == app::printable_text(tok, r.tokens));
    REQUIRE(out.str() == r.text + "\n");
  }
  c.chat = false;
  c.system = "x";
  REQUIRE_THROWS_WITH(app::prompt_ids(tok, c), ContainsSubstring("--system needs --chat"));
}

TEST_CASE("generate: token_limit keeps draws inside a smaller tokenizer's ids", "[generate]") {
  auto m = small_model(false, 5, 20.0);
  nn::GenerateOptions o;
  o.max_new_tokens = 6;
  o.token_limit = 9;
  std::vector<int64_t> ids = {1, 2};
  const auto out = nn::generate(*m, ids, o);
  REQUIRE(out.size() == 6);
  for (int64_t t : out) {
    REQUIRE(t < 9);
    auto full = full_logits(*m, ids);
    full.resize(9);
    REQUIRE(t == argmax_of(full));  // greedy over the allowed ids
    ids.push_back(t);
  }
  o.temperature = 1.0;
  for (int64_t t : nn::generate(*m, {3}, o)) REQUIRE(t < 9);
}

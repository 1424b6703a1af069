// The Llama 3 tokenizer (data/tokenizer.h) against Hugging Face `tokenizers`: ids of hand-picked strings
// and of a ~1 MB corpus regenerated from tests/data/tokenizer/llama3_cases.json (made by
// tools/make_tokenizer_fixtures.py), round trips (invalid UTF-8 included), special tokens, chat format.
#include "tools/tokenizer_corpus.h"
#include <algorithm>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/tokenizer.h"
#include "tests/helpers.h"


using kiln::data::ChatMessage;
using kiln::data::Tokenizer;
using json = nlohmann::json;

namespace {

std::string tokenizer_path() { return kiln::test::shared_data("llama3.1-tokenizer/tokenizer.json").string(); }

// The real Llama 3.1 tokenizer, loaded once; nullptr where the shared data is absent.
const Tokenizer* llama3() {
  static std::optional<Tokenizer> tok = []() -> std::optional<Tokenizer> {
    if (!std::filesystem::exists(tokenizer_path())) return std::nullopt;
    return Tokenizer::from_file(tokenizer_path());
  }();
  return tok ? &*tok : nullptr;
}

#define REQUIRE_LLAMA3(tok)                                                                          \
  const Tokenizer* tok = llama3();                                                                   \
  if (!tok) SKIP("Llama 3.1 tokenizer.json not found at " + tokenizer_path() +                      \
                 " (the shared data folder next to the repository)")

const json& fixture() {
  static const json j = [] {
    std::ifstream f(kiln::test::test_data("tokenizer/llama3_cases.json"), std::ios::binary);
    REQUIRE(f.good());
    return json::parse(f);
  }();
  return j;
}

std::string fnv1a(const std::vector<int32_t>& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int32_t id : ids) {
    auto u = static_cast<uint32_t>(id);
    for (int k = 0; k < 4; ++k) h = (h ^ ((u >> (8 * k)) & 0xFF)) * 0x100000001B3ull;
  }
  return fmt::format("{:016x}", h);
}

}  // namespace

TEST_CASE("tokenizer: byte-level alphabet is GPT-2's", "[tokenizer]") {
  CHECK(kiln::data::byte_to_unicode(' ') == "Ġ");
  CHECK(kiln::data::byte_to_unicode('\n') == "Ċ");
  CHECK(kiln::data::byte_to_unicode('a') == "a");
  CHECK(kiln::data::byte_to_unicode(0) == "Ā");
  CHECK(kiln::data::byte_to_unicode(0xAD) == "Ń");
  CHECK(kiln::data::byte_to_unicode(0xFF) == "ÿ");
}

TEST_CASE("tokenizer: errors", "[tokenizer]") {
  using Catch::Matchers::StartsWith;
  REQUIRE_THROWS_WITH(Tokenizer::from_file("/nonexistent/tokenizer.json"), StartsWith("[tokenizer] cannot open"));
  REQUIRE_THROWS_WITH(Tokenizer::from_json("{ not json"), StartsWith("[tokenizer] malformed JSON"));
  REQUIRE_THROWS_WITH(Tokenizer::from_json("{\"model\": {\"type\": \"BPE\"}}"), StartsWith("[tokenizer] malformed"));
  REQUIRE_THROWS_WITH(Tokenizer::from_json("{\"model\": {\"type\": \"WordPiece\"}}"),
                      StartsWith("[tokenizer] expected a BPE model"));
}

TEST_CASE("tokenizer: tiny hand-written BPE", "[tokenizer]") {
  // All 256 bytes, three merges, one special token.
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[kiln::data::byte_to_unicode(static_cast<uint8_t>(b))] = b;
  vocab["ab"] = 256;
  vocab["abc"] = 257;
  vocab["Ġab"] = 258;
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", "ab c", "Ġ ab"}}}},
            {"added_tokens", {{{"id", 259}, {"content", "<|end|>"}, {"special", true}}}},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"Regex", " ?\\p{L}+|\\s+|[^\\s\\p{L}]+"}}}, {"behavior", "Isolated"},
                 {"invert", false}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}}};
  Tokenizer tok = Tokenizer::from_json(j.dump());
  CHECK(tok.vocab_size() == 260);
  CHECK(tok.encode("abc ab abd") == std::vector<int32_t>{257, 258, 258, 'd'});
  CHECK(tok.encode("x<|end|>ab") == std::vector<int32_t>{'x', 259, 256});
  CHECK(tok.encode("x<|end|>", false, /*parse_special=*/false).size() == 8);
  CHECK(tok.decode(std::vector<int32_t>{257, 259, 258}) == "abc<|end|> ab");
  CHECK(tok.decode(std::vector<int32_t>{257, 259, 258}, /*skip_special=*/true) == "abc ab");
  CHECK(tok.id_to_token(258) == "Ġab");
  CHECK(tok.token_to_id("Ġab") == 258);
  CHECK(tok.token_to_id("nope") == -1);
  CHECK(tok.is_special(259));
  CHECK(tok.bos_id() == -1);
  REQUIRE_THROWS_WITH(tok.decode(std::vector<int32_t>{5, 260}), Catch::Matchers::StartsWith("[tokenizer] unknown token id 260"));
  REQUIRE_THROWS_WITH(tok.encode("a", true), Catch::Matchers::StartsWith("[tokenizer] add_bos"));
  // Holes in the ids are allowed; an id far past the tokens the file defines is an error (the id tables are
  // dense: found by the fuzzer, a tiny file asking for gigabytes).
  json holes = j;
  holes["added_tokens"][0]["id"] = 2 * 260 + 1023;
  CHECK(Tokenizer::from_json(holes.dump()).token_to_id("<|end|>") == 2 * 260 + 1023);
  json far = j;
  far["added_tokens"][0]["id"] = (1 << 30) - 1;
  REQUIRE_THROWS_WITH(Tokenizer::from_json(far.dump()), Catch::Matchers::ContainsSubstring("token id 1073741823 is out of range"));
}

TEST_CASE("tokenizer: Llama 3.1 ids match Hugging Face tokenizers", "[tokenizer]") {
  REQUIRE_LLAMA3(tok);
  CHECK(tok->vocab_size() == 128256);
  CHECK(tok->bos_id() == 128000);
  CHECK(tok->eos_id() == 128001);
  CHECK(tok->eot_id() == 128009);
  CHECK(tok->id_to_token(128009) == "<|eot_id|>");
  CHECK(tok->token_to_id("Ġthe") == 279);
  for (const json& c : fixture().at("cases")) {
    auto text = c.at("text").get<std::string>();
    INFO("text: " << text);
    auto ids = tok->encode(text);
    CHECK(ids == c.at("ids").get<std::vector<int32_t>>());
    CHECK(tok->encode(text, false, /*parse_special=*/false) == c.at("ids_special_as_text").get<std::vector<int32_t>>());
    auto with_bos = tok->encode(text, /*add_bos=*/true);
    REQUIRE(!with_bos.empty());
    CHECK(with_bos[0] == 128000);
    CHECK(tok->decode(ids) == text);
  }
}

TEST_CASE("tokenizer: Llama 3.1 on a 1 MB corpus matches Hugging Face tokenizers", "[tokenizer]") {
  REQUIRE_LLAMA3(tok);
  const json& c = fixture().at("corpus");
  auto docs = kiln::test::make_tokenizer_corpus(c);
  const json& digests = c.at("digests");
  REQUIRE(docs.size() == digests.size());
  size_t bytes = 0, mismatched = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    bytes += docs[i].size();
    auto ids = tok->encode(docs[i]);
    bool same = ids.size() == digests[i].at("count").get<size_t>() && fnv1a(ids) == digests[i].at("fnv1a");
    if (!same && mismatched++ < 3) {
      INFO("document " << i << ": " << docs[i].substr(0, 200));
      CHECK(ids.size() == digests[i].at("count").get<size_t>());
      CHECK(fnv1a(ids) == digests[i].at("fnv1a").get<std::string>());
    }
    if (tok->decode(ids) != docs[i]) CHECK(tok->decode(ids) == docs[i]);
  }
  CHECK(mismatched == 0);
  CHECK(bytes == c.at("total_bytes").get<size_t>());
  CHECK(bytes >= 1000000);
}

TEST_CASE("tokenizer: invalid UTF-8 and odd bytes round-trip", "[tokenizer]") {
  REQUIRE_LLAMA3(tok);
  std::vector<std::string> inputs = {
      std::string("\xff\xfe\xfd"),
      std::string("abc\x80" "def"),
      std::string("caf\xc3"),                      // truncated sequence at the end
      std::string("\xc3\x28 x \xe2\x82 y"),        // bad continuation, truncated in the middle
      std::string("\xed\xa0\x80 surrogate"),       // an encoded surrogate
      std::string("\xf8\x88\x80\x80\x80 five"),    // an overlong 5-byte form
      std::string("nul\0byte", 8),
      std::string("<|eot_id|>\xff<|eot_id|>"),
  };
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  inputs.push_back(all_bytes);
  for (const std::string& s : inputs) {
    auto ids = tok->encode(s);
    CHECK(tok->decode(ids) == s);
  }
  CHECK(tok->encode("\xff") == std::vector<int32_t>{tok->token_to_id("ÿ")});
  // Valid text around an invalid byte tokenizes as it would alone.
  auto a = tok->encode("hello world"), b = tok->encode(" again");
  auto mixed = tok->encode(std::string("hello world\xff again"));
  CHECK(mixed.size() == a.size() + 1 + b.size());
}

TEST_CASE("tokenizer: very long runs", "[tokenizer]") {
  REQUIRE_LLAMA3(tok);
  for (const std::string& s : {std::string(200000, ' '), std::string(100000, 'a'), std::string(50000, '\n'),
                               std::string(100000, '!') + "x"}) {
    auto ids = tok->encode(s);
    CHECK(tok->decode(ids) == s);
    CHECK(ids.size() < s.size());
  }
}

TEST_CASE("tokenizer: Llama 3 chat format", "[tokenizer]") {
  std::vector<ChatMessage> msgs = {{"system", " Be brief.\n"}, {"user", "Hi!"}};
  CHECK(Tokenizer::apply_chat_template(msgs, false) ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>");
  CHECK(Tokenizer::apply_chat_template(msgs, true).ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
  CHECK(Tokenizer::apply_chat_template({}, true) == "<|start_header_id|>assistant<|end_header_id|>\n\n");

  REQUIRE_LLAMA3(tok);
  CHECK(tok->encode_chat(msgs, true) == tok->encode(Tokenizer::apply_chat_template(msgs, true)));
  const json& chat = fixture().at("chat");
  std::vector<ChatMessage> fx;
  for (const json& m : chat.at("messages")) fx.push_back({m.at("role"), m.at("content")});
  CHECK(Tokenizer::apply_chat_template(fx, true) == chat.at("text").get<std::string>());
  CHECK(tok->encode(chat.at("text").get<std::string>()) == chat.at("ids").get<std::vector<int32_t>>());
  // encode_chat keeps a special token written inside content as text: no forged turn boundary.
  auto ids = tok->encode_chat(fx, true);
  CHECK(std::count(ids.begin(), ids.end(), tok->eot_id()) == 3);
  CHECK(tok->decode(ids) == chat.at("text").get<std::string>());
}

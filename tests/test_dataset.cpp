// Datasets (data/dataset.h, data/packing.h, data/default_corpus.h): text and JSONL readers with file:line
// errors, tokenisation and loss masks, packing arithmetic against a stream rebuilt here, seeded split and
// shuffles (properties), exact resume across epochs, and the default tokenizer against Hugging Face's ids.
#include <algorithm>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/error.h"
#include "data/dataset.h"
#include "data/default_corpus.h"
#include "data/packing.h"
#include "data/tokenizer.h"
#include "data/utf8.h"
#include "tests/helpers.h"


using namespace kiln::data;
using Catch::Matchers::ContainsSubstring;
using json = nlohmann::json;

namespace {

std::string data_path(const std::string& leaf) { return kiln::test::test_data("dataset/" + leaf).string(); }

// The committed default tokenizer, loaded once.
const Tokenizer& default_tok() {
  static const Tokenizer tok = Tokenizer::from_file(default_tokenizer_path());
  return tok;
}

// Random documents with ids in [0, 1000) and random masks (bos-like first token masked).
std::vector<Document> random_docs(int64_t n, int64_t max_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Document> docs(static_cast<size_t>(n));
  for (Document& d : docs) {
    auto len = static_cast<size_t>(1 + rng() % static_cast<uint64_t>(max_len));
    for (size_t i = 0; i < len; ++i) {
      d.ids.push_back(static_cast<int32_t>(rng() % 1000));
      d.loss.push_back(i == 0 ? 0 : static_cast<uint8_t>(rng() % 4 != 0));
    }
  }
  return docs;
}

// An epoch's stream rebuilt from epoch_order: (token, counts in loss) per position.
std::vector<std::pair<int64_t, bool>> stream_of(const PackedDataset& ds, int64_t epoch) {
  std::vector<std::pair<int64_t, bool>> s;
  for (int64_t i : ds.epoch_order(epoch)) {
    const Document& d = ds.documents()[static_cast<size_t>(i)];
    for (size_t k = 0; k < d.ids.size(); ++k) s.emplace_back(d.ids[k], d.loss[k] != 0);
  }
  return s;
}

bool is_permutation_of_iota(std::vector<int64_t> p) {
  std::sort(p.begin(), p.end());
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] != static_cast<int64_t>(i)) return false;
  return true;
}

struct BatchValues {
  std::vector<int64_t> inputs, labels;
  int64_t rows, n_loss;
  bool operator==(const BatchValues&) const = default;
};

BatchValues values(const Batch& b) {
  return {b.input_ids.to_vector<int64_t>(), b.labels.to_vector<int64_t>(), b.input_ids.shape()[0], b.n_loss_tokens};
}

}  // namespace

TEST_CASE("default tokenizer matches Hugging Face tokenizers ids", "[dataset]") {
  std::ifstream f(data_path("default_tokenizer_ids.json"), std::ios::binary);
  REQUIRE(f.good());
  json fx = json::parse(f);
  const Tokenizer& tok = default_tok();
  CHECK(tok.vocab_size() == fx["vocab_size"].get<int64_t>());
  CHECK(tok.vocab_size() == 4096);
  CHECK(tok.bos_id() == fx["bos_id"].get<int32_t>());
  CHECK(tok.eos_id() == fx["eos_id"].get<int32_t>());
  CHECK(tok.eot_id() == fx["eot_id"].get<int32_t>());
  for (const char* s : {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|reserved_special_token_250|>"}) {
    INFO(s);
    REQUIRE(tok.token_to_id(s) >= 0);
    CHECK(tok.is_special(tok.token_to_id(s)));
  }
  REQUIRE(fx["cases"].size() >= 50);
  int64_t total = 0;
  for (const json& c : fx["cases"]) {
    auto text = c["text"].get<std::string>();
    auto want = c["ids"].get<std::vector<int32_t>>();
    INFO(text);
    std::vector<int32_t> got = tok.encode(text, /*add_bos=*/false, /*parse_special=*/true);
    REQUIRE(got == want);
    CHECK(tok.decode(got) == text);
    total += static_cast<int64_t>(got.size());
  }
  CHECK(total > 2000);  // the cases are not trivially short
}

TEST_CASE("plain text: whole files, blank-line and separator splits", "[dataset]") {
  SECTION("separator (fortune files)") {
    auto docs = load_documents(data_path("fortunes.txt"), TextOptions{TextSplit::separator, "%"});
    REQUIRE(docs.size() == 3);
    CHECK(docs[0].text == "A penny saved is a penny earned.\n\t-- Benjamin Franklin");
    CHECK(docs[1].text == "Two lines,\nthe second one.");
    CHECK(docs[2].text == "Last one without a closing separator.");
    CHECK_THAT(docs[1].origin, ContainsSubstring("fortunes.txt:7"));
    CHECK_THAT(docs[2].origin, ContainsSubstring("fortunes.txt:10"));
    for (const auto& d : docs) CHECK(d.kind == RawDocument::Kind::text);
  }
  SECTION("blank lines, CRLF and whitespace-only lines") {
    auto docs = load_documents(data_path("paragraphs.txt"), TextOptions{TextSplit::blank_lines, ""});
    REQUIRE(docs.size() == 3);
    CHECK(docs[0].text == "First paragraph, line one.\nline two.");
    CHECK(docs[1].text == "Second paragraph.");
    CHECK(docs[2].text == "Third");
    CHECK_THAT(docs[1].origin, ContainsSubstring("paragraphs.txt:6"));
  }
  SECTION("a directory: every file, sorted, hidden ones skipped, .jsonl read as JSONL") {
    auto docs = load_documents(data_path("texts"));
    REQUIRE(docs.size() == 3);
    CHECK(docs[0].text == "The first file is a single document.\nIt has two lines.\n");
    CHECK(docs[1].text == "A JSONL document inside the folder.");
    CHECK(docs[2].text == "Second file, in a sub folder.\n");
    CHECK_THAT(docs[2].origin, ContainsSubstring("b.txt:1"));
  }
  SECTION("empty inputs give no documents") {
    CHECK(parse_text("", "e.txt").empty());
    CHECK(parse_text(" \n\t\n", "e.txt").empty());
    CHECK(parse_text("\n\n\n", "e.txt", TextOptions{TextSplit::blank_lines, ""}).empty());
    CHECK(parse_text("%\n%\n", "e.txt", TextOptions{TextSplit::separator, "%"}).empty());
    CHECK(parse_jsonl("", "e.jsonl").empty());
    CHECK(parse_jsonl("\n  \n", "e.jsonl").empty());
    CHECK(tokenize_documents(default_tok(), {}).empty());
  }
  SECTION("errors") {
    REQUIRE_THROWS_WITH(load_documents(data_path("no_such_file.txt")), ContainsSubstring("[dataset]") &&
                                                                           ContainsSubstring("no_such_file.txt"));
    REQUIRE_THROWS_WITH(parse_text("a\n%\nb", "x", TextOptions{TextSplit::separator, ""}),
                        ContainsSubstring("[dataset]") && ContainsSubstring("separator"));
  }
}

TEST_CASE("JSONL: formats detected per line, errors name file:line", "[dataset]") {
  auto docs = load_documents(data_path("mixed.jsonl"));
  REQUIRE(docs.size() == 3);
  CHECK(docs[0].kind == RawDocument::Kind::text);
  CHECK(docs[0].text == "Plain text document.");
  CHECK(docs[1].kind == RawDocument::Kind::prompt_completion);
  CHECK(docs[1].prompt == "Translate to French: cheese");
  CHECK(docs[1].completion == " fromage");
  CHECK_THAT(docs[1].origin, ContainsSubstring("mixed.jsonl:3"));
  REQUIRE(docs[2].kind == RawDocument::Kind::chat);
  REQUIRE(docs[2].messages.size() == 5);
  CHECK(docs[2].messages[2].role == "assistant");
  CHECK(docs[2].messages[2].content == "  Hi.  ");

  REQUIRE_THROWS_WITH(load_documents(data_path("bad_role.jsonl")),
                      ContainsSubstring("[dataset]") && ContainsSubstring("bad_role.jsonl:2") &&
                          ContainsSubstring("\"bot\""));
  struct Bad {
    const char* content;
    const char* where;
    const char* what;
  };
  const Bad bad[] = {
      {"{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n", "f.jsonl:2", "malformed JSON"},
      {"\n\n{\"txt\": \"typo\"}\n", "f.jsonl:3", "\"txt\""},
      {"{\"text\": 42}\n", "f.jsonl:1", "must be a string, found number"},
      {"[1, 2]\n", "f.jsonl:1", "expected a JSON object, found array"},
      {"{\"prompt\": \"p\"}\n", "f.jsonl:1", "only \"prompt\""},
      {"{\"completion\": \"c\"}\n", "f.jsonl:1", "only \"completion\""},
      {"{\"text\": \"t\", \"messages\": []}\n", "f.jsonl:1", "several"},
      {"{\"messages\": \"hi\"}\n", "f.jsonl:1", "must be an array, found string"},
      {"{\"messages\": []}\n", "f.jsonl:1", "is empty"},
      {"{\"messages\": [{\"role\": \"user\"}]}\n", "f.jsonl:1: messages[0]", "\"content\""},
      {"{\"messages\": [{\"role\": \"user\", \"content\": null}]}\n", "f.jsonl:1: messages[0]", "found null"},
      {"{\"messages\": [3]}\n", "f.jsonl:1: messages[0]", "expected an object, found number"},
      {"{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\r\n", "f.jsonl:1: messages[0]", "unknown role"},
  };
  for (const Bad& b : bad) {
    INFO(b.content);
    REQUIRE_THROWS_WITH(parse_jsonl(b.content, "f.jsonl"), ContainsSubstring("[dataset]") &&
                                                                 ContainsSubstring(b.where) && ContainsSubstring(b.what));
  }
}

TEST_CASE("JSON files: JSON Lines named .json, an array of objects, one object; binary files are errors", "[dataset]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("kiln_json_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto write = [&](const std::string& leaf, const std::string& bytes) {
    std::ofstream(dir / leaf, std::ios::binary) << bytes;
    return (dir / leaf).string();
  };
  // what Hugging Face `datasets.to_json` writes: one object per line, extra columns allowed
  auto lines = load_documents(write("hf.json", "{\"text\":\"first\",\"id\":0}\n{\"text\":\"second\",\"id\":1}\n"));
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].kind == RawDocument::Kind::text);
  CHECK(lines[1].text == "second");
  CHECK_THAT(lines[1].origin, ContainsSubstring("hf.json:2"));
  auto array = load_documents(write("array.json", "[\n {\"text\": \"a\"},\n {\"prompt\": \"p\", \"completion\": \"c\"}\n]\n"));
  REQUIRE(array.size() == 2);
  CHECK(array[0].text == "a");
  CHECK(array[1].kind == RawDocument::Kind::prompt_completion);
  CHECK_THAT(array[1].origin, ContainsSubstring("array.json: [1]"));
  auto one = load_documents(write("one.json", "{\n  \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]\n}\n"));
  REQUIRE(one.size() == 1);
  CHECK(one[0].kind == RawDocument::Kind::chat);
  REQUIRE_THROWS_WITH(load_documents(write("nums.json", "[1, 2]")),
                      ContainsSubstring("[dataset]") && ContainsSubstring("nums.json: [0]") &&
                          ContainsSubstring("expected a JSON object, found number"));
  REQUIRE_THROWS_WITH(load_documents(write("str.json", "\"text\"")),
                      ContainsSubstring("[dataset]") && ContainsSubstring("expected a JSON array of objects"));
  REQUIRE_THROWS_WITH(load_documents(write("broken.json", "{\"text\": \"a\"}\n{\"text\": \n")),
                      ContainsSubstring("broken.json:2") && ContainsSubstring("malformed JSON"));

  // binary content is never trained on as text: NUL bytes or invalid UTF-8, named with byte and line
  REQUIRE_THROWS_WITH(load_documents(write("model.bin", std::string("GGUF\0\0\x01\x02", 8))),
                      ContainsSubstring("[dataset]") && ContainsSubstring("model.bin") &&
                          ContainsSubstring("a NUL byte at byte 4 (line 1)") && ContainsSubstring("binary"));
  REQUIRE_THROWS_WITH(load_documents(write("latin1.txt", "ok\ncaf\xe9 au lait\n")),
                      ContainsSubstring("invalid UTF-8 byte 0xE9 at byte 6 (line 2)"));
  REQUIRE_THROWS_WITH(load_documents(write("bad.jsonl", "{\"text\": \"\xff\"}\n")), ContainsSubstring("bad.jsonl: not UTF-8"));
  // a folder reads its files; a binary one among them is named
  const fs::path folder = dir / "folder";
  fs::create_directories(folder);
  std::ofstream(folder / "a.txt") << "caf\xc3\xa9 \xf0\x9f\x98\x80";  // valid multi-byte UTF-8 is fine
  REQUIRE(load_documents(folder.string()).size() == 1);
  std::ofstream(folder / "b.png", std::ios::binary) << std::string("\x89PNG\r\n\x1a\n\0", 9);
  REQUIRE_THROWS_WITH(load_documents(folder.string()), ContainsSubstring("b.png: not UTF-8 text"));
  fs::remove_all(dir);
}

TEST_CASE("UTF-8: invalid bytes found and replaced, streams hold back split characters", "[dataset]") {
  CHECK(find_invalid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == std::string_view::npos);
  CHECK(find_invalid_utf8("a\x80") == 1);           // stray continuation byte
  CHECK(find_invalid_utf8("a\xc0\xaf") == 1);       // overlong "/"
  CHECK(find_invalid_utf8("\xed\xa0\x80") == 0);    // a surrogate
  CHECK(find_invalid_utf8("\xf4\x90\x80\x80") == 0);  // past U+10FFFF
  CHECK(find_invalid_utf8("ab\xe2\x82") == 2);      // cut off by the end
  const std::string fffd(kReplacementCharacter);
  CHECK(to_valid_utf8("ok") == "ok");
  CHECK(to_valid_utf8("a\x80z") == "a" + fffd + "z");
  CHECK(to_valid_utf8("\xe2\x82z") == fffd + "z");            // one U+FFFD per maximal subpart
  CHECK(to_valid_utf8("\xf0\x9f\x98") == fffd);
  CHECK(to_valid_utf8("\xc0\xaf") == fffd + fffd);            // C0 never starts a sequence
  const std::string text = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z\x80q\xe2";
  for (size_t step : {1, 2, 3, 5}) {
    Utf8Stream stream;
    std::string out;
    for (size_t i = 0; i < text.size(); i += step) {
      out += stream.push(text.substr(i, step));
      CHECK(find_invalid_utf8(out) == std::string_view::npos);
      CHECK(stream.pending().size() <= 3);
    }
    out += stream.finish();
    CHECK(out == "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z" + fffd + "q" + fffd);
    CHECK(stream.pending().empty());
  }
}

TEST_CASE("tokenised documents: bos/eos, eot for chat, loss masks", "[dataset]") {
  const Tokenizer& tok = default_tok();
  auto raws = load_documents(data_path("mixed.jsonl"));
  auto docs = tokenize_documents(tok, raws);
  REQUIRE(docs.size() == 3);
  for (const Document& d : docs) REQUIRE(d.ids.size() == d.loss.size());

  SECTION("text: everything but bos counts") {
    std::vector<int32_t> body = tok.encode("Plain text document.", false, false);
    std::vector<int32_t> want{tok.bos_id()};
    want.insert(want.end(), body.begin(), body.end());
    want.push_back(tok.eos_id());
    CHECK(docs[0].ids == want);
    std::vector<uint8_t> mask(want.size(), 1);
    mask[0] = 0;
    CHECK(docs[0].loss == mask);
  }
  SECTION("prompt/completion: the prompt is masked") {
    const Document& d = docs[1];
    CHECK(d.ids.front() == tok.bos_id());
    CHECK(d.ids.back() == tok.eos_id());
    std::vector<int32_t> kept, dropped;
    for (size_t i = 0; i < d.ids.size(); ++i) (d.loss[i] ? kept : dropped).push_back(d.ids[i]);
    CHECK(tok.decode(kept) == " fromage<|end_of_text|>");
    CHECK(tok.decode(dropped) == "<|begin_of_text|>Translate to French: cheese");
  }
  SECTION("chat: encode_chat's ids, only assistant turns and their eot count") {
    const Document& d = docs[2];
    CHECK(d.ids == tok.encode_chat(raws[2].messages, false));
    CHECK(d.ids.back() == tok.eot_id());
    std::vector<int32_t> kept, dropped;
    for (size_t i = 0; i < d.ids.size(); ++i) (d.loss[i] ? kept : dropped).push_back(d.ids[i]);
    CHECK(tok.decode(kept) == "Hi.<|eot_id|>Hi again.<|eot_id|>");
    std::string masked = tok.decode(dropped);
    CHECK(masked ==
          "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nSay hi.<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
          "\n\n<|start_header_id|>user<|end_header_id|>\n\nAgain?<|eot_id|><|start_header_id|>assistant"
          "<|end_header_id|>\n\n");
    // The kept runs are contiguous spans that each end at an eot.
    for (size_t i = 1; i < d.ids.size(); ++i)
      if (d.loss[i - 1] && !d.loss[i]) CHECK(d.ids[i - 1] == tok.eot_id());
  }
  SECTION("special-token text inside a document stays text") {
    RawDocument r;
    r.text = "a <|eot_id|> b";
    Document d = tokenize_document(tok, r);
    CHECK(std::count(d.ids.begin(), d.ids.end(), tok.eot_id()) == 0);
    CHECK(tok.decode(d.ids) == "<|begin_of_text|>a <|eot_id|> b<|end_of_text|>");
  }
}

TEST_CASE("seeded permutations and draws: deterministic, properties", "[dataset]") {
  for (int64_t n : {0, 1, 2, 7, 1000}) {
    auto p = seeded_permutation(n, 42);
    CHECK(static_cast<int64_t>(p.size()) == n);
    CHECK(is_permutation_of_iota(p));
    CHECK(p == seeded_permutation(n, 42));
  }
  auto a = seeded_permutation(1000, 1), b = seeded_permutation(1000, 2);
  CHECK(a != b);
  int64_t fixed = 0;
  for (size_t i = 0; i < a.size(); ++i) fixed += a[i] == static_cast<int64_t>(i);
  CHECK(fixed < 10);  // a shuffle, not (nearly) the identity: expected ~1 fixed point
  CHECK(mix_seed(7, 0) != mix_seed(7, 1));
  CHECK(mix_seed(7, 0) != mix_seed(8, 0));
  CHECK(mix_seed(7, 3) == mix_seed(7, 3));

  // bounded_draw: in range, every value reached, counts near uniform (n = 6, 60000 draws).
  std::mt19937_64 rng(5);
  std::vector<int64_t> counts(6, 0);
  for (int i = 0; i < 60000; ++i) {
    uint64_t x = bounded_draw(rng, 6);
    REQUIRE(x < 6);
    ++counts[x];
  }
  for (int64_t c : counts) CHECK(std::abs(c - 10000) < 500);  // ~5 sigma
  std::mt19937_64 r1(9);
  CHECK(bounded_draw(r1, 1) == 0);
  REQUIRE_THROWS_WITH(bounded_draw(r1, 0), ContainsSubstring("[dataset]"));
  // First position's distribution over many seeds: each of 5 values about 1/5 of the time.
  std::vector<int64_t> first(5, 0);
  for (uint64_t s = 0; s < 5000; ++s) ++first[static_cast<size_t>(seeded_permutation(5, s)[0])];
  for (int64_t c : first) CHECK(std::abs(c - 1000) < 160);
}

TEST_CASE("held-out split: disjoint, complete, deterministic", "[dataset]") {
  const int64_t n = 101;
  Split s = split_indices(n, SplitOptions{0.1, -1, 3});
  CHECK(s.eval.size() == 10);
  CHECK(s.train.size() == 91);
  std::vector<int64_t> all = s.train;
  all.insert(all.end(), s.eval.begin(), s.eval.end());
  CHECK(is_permutation_of_iota(all));  // disjoint and complete
  CHECK(std::is_sorted(s.train.begin(), s.train.end()));
  CHECK(std::is_sorted(s.eval.begin(), s.eval.end()));
  Split again = split_indices(n, SplitOptions{0.1, -1, 3});
  CHECK((again.eval == s.eval && again.train == s.train));
  CHECK(split_indices(n, SplitOptions{0.1, -1, 4}).eval != s.eval);
  CHECK(split_indices(n, SplitOptions{0.0, 17, 3}).eval.size() == 17);
  CHECK(split_indices(n, SplitOptions{0.0, -1, 3}).eval.empty());
  CHECK(split_indices(3, SplitOptions{0.01, -1, 3}).eval.size() == 1);   // at least one
  CHECK(split_indices(3, SplitOptions{0.99, -1, 3}).train.size() == 1);  // never all
  CHECK(split_indices(0, SplitOptions{0.5, -1, 3}).eval.empty());
  REQUIRE_THROWS_WITH(split_indices(5, SplitOptions{0.0, 6, 0}), ContainsSubstring("[dataset]"));
  REQUIRE_THROWS_WITH(split_indices(5, SplitOptions{1.0, -1, 0}), ContainsSubstring("[dataset]"));

  auto docs = random_docs(n, 20, 11);
  auto eval_docs = select_documents(docs, s.eval);
  REQUIRE(eval_docs.size() == 10);
  CHECK(eval_docs[3].ids == docs[static_cast<size_t>(s.eval[3])].ids);
  REQUIRE_THROWS_WITH(select_documents(docs, {101}), ContainsSubstring("[dataset]"));
}

TEST_CASE("packing: rows of T + 1 tokens, shifted labels, masks, long documents split", "[dataset]") {
  for (int64_t T : {1, 5, 16, 33}) {
    auto docs = random_docs(23, 40, static_cast<uint64_t>(T));
    PackedDataset ds(docs, PackOptions{T, 4, 99, true, 2, 7});
    auto stream = stream_of(ds, 0);
    auto N = static_cast<int64_t>(stream.size());
    INFO("T " << T << " N " << N);
    CHECK(ds.tokens_per_epoch() == N);
    CHECK(ds.rows_per_epoch() == (N - 1 + T - 1) / T);
    // Every stream token after the first is a label exactly once per epoch (where it counts).
    int64_t want_loss = 0;
    for (int64_t p = 1; p < N; ++p) want_loss += stream[static_cast<size_t>(p)].second;
    int64_t got_loss = 0;
    std::vector<int64_t> in(static_cast<size_t>(T)), lab(static_cast<size_t>(T));
    for (int64_t r = 0; r < ds.rows_per_epoch(); ++r) {
      ds.read_row(0, r, in.data(), lab.data());
      for (int64_t j = 0; j < T; ++j) {
        int64_t p = r * T + j;
        int64_t want_in = p < N ? stream[static_cast<size_t>(p)].first : 7;
        int64_t want_lab = p + 1 < N && stream[static_cast<size_t>(p + 1)].second ? stream[static_cast<size_t>(p + 1)].first
                                                                                    : kIgnoreIndex;
        REQUIRE(in[static_cast<size_t>(j)] == want_in);
        REQUIRE(lab[static_cast<size_t>(j)] == want_lab);
        got_loss += lab[static_cast<size_t>(j)] != kIgnoreIndex;
      }
    }
    CHECK(got_loss == want_loss);
    // Batches: (B, T) i64, n_loss_tokens counted, 2 epochs' rows in all, the last batch short.
    int64_t rows = 0, batches = 0;
    while (auto b = ds.next()) {
      REQUIRE(b->input_ids.dtype() == kiln::DType::i64);
      REQUIRE(b->labels.dtype() == kiln::DType::i64);
      REQUIRE(b->input_ids.shape()[1] == T);
      REQUIRE(b->labels.shape() == b->input_ids.shape());
      auto l = b->labels.to_vector<int64_t>();
      CHECK(b->n_loss_tokens == std::count_if(l.begin(), l.end(), [](int64_t v) { return v != kIgnoreIndex; }));
      rows += b->input_ids.shape()[0];
      ++batches;
    }
    CHECK(rows == 2 * ds.rows_per_epoch());
    CHECK(batches == (rows + 3) / 4);
    CHECK(ds.done());
  }
}

TEST_CASE("packing: documents joined by bos/eos separators, T larger than the corpus", "[dataset]") {
  const Tokenizer& tok = default_tok();
  auto docs = tokenize_documents(tok, load_documents(data_path("fortunes.txt"), TextOptions{TextSplit::separator, "%"}));
  int64_t n = 0;
  for (const auto& d : docs) n += static_cast<int64_t>(d.ids.size());
  const int64_t T = n + 50;  // one row, padded
  PackedDataset ds(docs, PackOptions{T, 2, 5, false, 1, tok.eos_id()});
  REQUIRE(ds.rows_per_epoch() == 1);
  auto b = ds.next();
  REQUIRE(b.has_value());
  CHECK(b->input_ids.shape() == kiln::Shape{1, T});
  auto in = b->input_ids.to_vector<int64_t>();
  auto lab = b->labels.to_vector<int64_t>();
  std::vector<int32_t> text(in.begin(), in.begin() + n);
  CHECK(tok.decode(text) ==
        "<|begin_of_text|>A penny saved is a penny earned.\n\t-- Benjamin Franklin<|end_of_text|>"
        "<|begin_of_text|>Two lines,\nthe second one.<|end_of_text|>"
        "<|begin_of_text|>Last one without a closing separator.<|end_of_text|>");
  for (int64_t j = n; j < T; ++j) CHECK(in[static_cast<size_t>(j)] == tok.eos_id());
  for (int64_t j = n - 1; j < T; ++j) CHECK(lab[static_cast<size_t>(j)] == kIgnoreIndex);
  // Labels: the next token, except where the next one is a bos (masked).
  for (int64_t j = 0; j + 1 < n; ++j) {
    int64_t next = in[static_cast<size_t>(j + 1)];
    CHECK(lab[static_cast<size_t>(j)] == (next == tok.bos_id() ? kIgnoreIndex : next));
  }
  CHECK(b->n_loss_tokens == n - 3);  // all but the three bos
  CHECK_FALSE(ds.next().has_value());

  SECTION("no tokens at all: no batch, even when looping for ever") {
    PackedDataset empty({}, PackOptions{8, 2, 0, true, -1, 0});
    CHECK(empty.rows_per_epoch() == 0);
    CHECK_FALSE(empty.next().has_value());
    PackedDataset one_token({Document{{5}, {1}}}, PackOptions{8, 2, 0, true, -1, 0});
    CHECK_FALSE(one_token.next().has_value());
  }
  SECTION("bad options") {
    REQUIRE_THROWS_WITH(PackedDataset(docs, PackOptions{0, 2, 0, true, 1, 0}), ContainsSubstring("[dataset] seq_len"));
    REQUIRE_THROWS_WITH(PackedDataset(docs, PackOptions{4, 0, 0, true, 1, 0}), ContainsSubstring("[dataset] batch_size"));
    REQUIRE_THROWS_WITH(PackedDataset({Document{{1, 2}, {1}}}, PackOptions{}), ContainsSubstring("[dataset]"));
  }
}

TEST_CASE("packing: shuffled per epoch by seed", "[dataset]") {
  auto docs = random_docs(50, 10, 1);
  PackedDataset a(docs, PackOptions{8, 2, 10, true, -1, 0});
  PackedDataset b(docs, PackOptions{8, 2, 10, true, -1, 0});
  PackedDataset c(docs, PackOptions{8, 2, 11, true, -1, 0});
  PackedDataset plain(docs, PackOptions{8, 2, 10, false, -1, 0});
  for (int64_t e = 0; e < 4; ++e) {
    auto o = a.epoch_order(e);
    CHECK(is_permutation_of_iota(o));
    CHECK(o == b.epoch_order(e));
    CHECK(o != c.epoch_order(e));
    CHECK(o != a.epoch_order(e + 1));
    std::vector<int64_t> iota(50);
    std::iota(iota.begin(), iota.end(), int64_t{0});
    CHECK(plain.epoch_order(e) == iota);
  }
  for (int i = 0; i < 5; ++i) CHECK(values(*a.next()) == values(*b.next()));
  CHECK(values(*a.next()) != values(*c.next()));
}

TEST_CASE("packing: resume from a saved position equals the uninterrupted run", "[dataset]") {
  // A few rows per epoch, not a multiple of the batch size: batches straddle epoch boundaries.
  const PackOptions opt{6, 4, 1234, true, -1, 0};
  uint64_t doc_seed = 77;
  while (PackedDataset(random_docs(9, 12, doc_seed), opt).rows_per_epoch() % opt.batch_size == 0) ++doc_seed;
  auto docs = random_docs(9, 12, doc_seed);
  PackedDataset ref(docs, opt);
  REQUIRE(ref.rows_per_epoch() % opt.batch_size != 0);
  std::vector<BatchValues> run;
  std::vector<std::string> saved;  // position before each batch, as JSON
  for (int i = 0; i < 40; ++i) {
    saved.push_back(ref.position().to_json());
    run.push_back(values(*ref.next()));
  }
  REQUIRE(ref.position().epoch >= 5);
  for (int cut : {0, 1, 3, 7, 13, 22, 39}) {
    INFO("cut " << cut);
    DataPosition p = DataPosition::from_json(saved[static_cast<size_t>(cut)]);
    CHECK(p.to_json() == saved[static_cast<size_t>(cut)]);
    PackedDataset resumed(docs, opt);
    resumed.restore(p);
    CHECK(resumed.position() == p);
    for (size_t i = static_cast<size_t>(cut); i < run.size(); ++i) REQUIRE(values(*resumed.next()) == run[i]);
  }
  // A finite run resumed in its last epoch stops where the uninterrupted one does.
  {
    PackOptions fin = opt;
    fin.epochs = 3;
    PackedDataset full(docs, fin), part(docs, fin);
    std::vector<BatchValues> all;
    std::string mid;
    while (true) {
      if (all.size() == 5) mid = full.position().to_json();
      auto b = full.next();
      if (!b) break;
      all.push_back(values(*b));
    }
    REQUIRE(all.size() > 5);
    CHECK(all.back().rows < fin.batch_size);  // the last batch is short
    part.restore(DataPosition::from_json(mid));
    for (size_t i = 5; i < all.size(); ++i) REQUIRE(values(*part.next()) == all[i]);
    CHECK_FALSE(part.next().has_value());
  }
  // Positions from other data or options are refused; malformed JSON too.
  PackedDataset other_seed(docs, PackOptions{6, 4, 1, true, -1, 0});
  REQUIRE_THROWS_WITH(other_seed.restore(DataPosition::from_json(saved[3])), ContainsSubstring("[dataset]") &&
                                                                                  ContainsSubstring("seed"));
  PackedDataset other_len(docs, PackOptions{7, 4, 1234, true, -1, 0});
  REQUIRE_THROWS_WITH(other_len.restore(DataPosition::from_json(saved[3])), ContainsSubstring("seq_len"));
  auto changed = docs;
  changed[4].ids[0] += 1;
  PackedDataset other_docs(changed, opt);
  REQUIRE_THROWS_WITH(other_docs.restore(DataPosition::from_json(saved[3])), ContainsSubstring("fingerprint"));
  DataPosition bad_row = DataPosition::from_json(saved[3]);
  bad_row.row = ref.rows_per_epoch();
  REQUIRE_THROWS_WITH(PackedDataset(docs, opt).restore(bad_row), ContainsSubstring("row"));
  REQUIRE_THROWS_WITH(DataPosition::from_json("{\"epoch\": 1"), ContainsSubstring("[dataset]"));
  REQUIRE_THROWS_WITH(DataPosition::from_json("{\"epoch\": 1, \"row\": 0, \"seed\": 1, \"seq_len\": 6}"),
                      ContainsSubstring("fingerprint"));
  REQUIRE_THROWS_WITH(DataPosition::from_json("{\"epoch\": \"1\", \"row\": 0, \"seed\": 1, \"seq_len\": 6, "
                                              "\"fingerprint\": \"0000000000000000\"}"),
                      ContainsSubstring("epoch"));
}

TEST_CASE("KJV corpus: the King James Bible from tools/bootstrap.sh, with the default tokenizer", "[dataset]") {
  const char* old = std::getenv("KILN_KJV_CORPUS");
  std::string saved = old ? old : "";
  ::setenv("KILN_KJV_CORPUS", "/nonexistent/kiln/kjv.txt", 1);
  REQUIRE_THROWS_WITH(kjv_corpus_path(), ContainsSubstring("[dataset]") && ContainsSubstring("tools/bootstrap.sh"));
  if (old) ::setenv("KILN_KJV_CORPUS", saved.c_str(), 1);
  else ::unsetenv("KILN_KJV_CORPUS");

  std::string path;
  try {
    path = kjv_corpus_path();
  } catch (const kiln::Error& e) {
    SKIP(e.what());
  }
  auto raws = load_documents(path, default_corpus_options());
  REQUIRE(raws.size() == 1189);  // chapters
  CHECK(raws.front().text.rfind("Genesis 1\nIn the beginning God created the heaven and the earth.\n", 0) == 0);
  CHECK(raws.back().text.rfind("Revelation 22\n", 0) == 0);
  std::ifstream f(data_path("default_tokenizer_ids.json"), std::ios::binary);
  json fx = json::parse(f);
  REQUIRE(fx["corpus_documents"].get<size_t>() == raws.size());
  // The whole corpus: as many tokens as Hugging Face's tokenizer gave (the fixture), plus bos/eos each.
  auto all_docs = tokenize_documents(default_tok(), raws);
  int64_t n_tokens = 0;
  for (const Document& d : all_docs) n_tokens += static_cast<int64_t>(d.ids.size()) - 2;
  CHECK(n_tokens == fx["corpus_tokens"].get<int64_t>());
  // A seeded sample decodes back to its text.
  Split s = split_indices(static_cast<int64_t>(raws.size()), SplitOptions{0.0, 40, 8});
  std::vector<RawDocument> sample;
  for (int64_t i : s.eval) sample.push_back(raws[static_cast<size_t>(i)]);
  auto docs = tokenize_documents(default_tok(), sample);
  for (size_t i = 0; i < docs.size(); ++i) CHECK(default_tok().decode(docs[i].ids, true) == sample[i].text);
  PackedDataset ds(docs, PackOptions{128, 4, 0, true, -1, 0});
  auto b = ds.next();
  REQUIRE(b.has_value());
  CHECK(b->n_loss_tokens > 4 * 128 - 8);
}

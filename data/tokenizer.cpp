// Byte-level BPE from a Hugging Face tokenizer.json: loading (vocab, merges, added tokens, split regex),
// encode (special tokens -> PCRE2 pre-tokens -> cached BPE per pre-token), decode, and the Llama 3
// chat format.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/tokenizer.h"
#include "core/file_io.h"

#include <pcre2.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/json_int.h"

namespace kiln::data {

namespace {

using json = nlohmann::json;

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the rest to 256, 257, ...
struct ByteAlphabet {
  std::array<std::string, 256> to_unicode;
  std::array<int, 324> to_byte;  // code point -> byte, -1 where none
  ByteAlphabet() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      int cp = printable ? b : 256 + extra++;
      to_byte[static_cast<size_t>(cp)] = b;
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      to_unicode[static_cast<size_t>(b)] = std::move(s);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// "Ġhello" -> " hello". Throws when a code point is outside the byte-level alphabet.
std::string token_to_bytes(std::string_view token) {
  const ByteAlphabet& a = alphabet();
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    auto c = static_cast<unsigned char>(token[i]);
    uint32_t cp = 0;
    if (c < 0x80) {
      cp = c;
      i += 1;
    } else if ((c & 0xE0) == 0xC0 && i + 1 < token.size()) {
      cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(token[i + 1]) & 0x3Fu);
      i += 2;
    } else {
      KILN_FAIL("tokenizer", "vocabulary token {:?} is not in the byte-level alphabet", std::string(token));
    }
    if (cp >= a.to_byte.size() || a.to_byte[cp] < 0)
      KILN_FAIL("tokenizer", "vocabulary token {:?} is not in the byte-level alphabet", std::string(token));
    out.push_back(static_cast<char>(a.to_byte[cp]));
  }
  return out;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

struct MergeInfo {
  int32_t rank;
  int32_t new_id;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// (left id, right id) -> merge, open addressing with linear probing: the BPE loop's hot lookup.
class MergeTable {
 public:
  void build(const std::vector<std::pair<uint64_t, MergeInfo>>& entries) {
    bits_ = 4;
    while ((size_t{1} << bits_) < 2 * entries.size() + 16) ++bits_;
    slots_.assign(size_t{1} << bits_, Slot{kEmpty, {0, 0}});
    for (const auto& [key, info] : entries) {
      size_t i = index(key);
      while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & (slots_.size() - 1);
      if (slots_[i].key == kEmpty) slots_[i] = Slot{key, info};  // the first (lowest-rank) duplicate wins
    }
  }
  const MergeInfo* find(int32_t a, int32_t b) const {
    uint64_t key = pair_key(a, b);
    for (size_t i = index(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == key) return &slots_[i].info;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key;
    MergeInfo info;
  };
  size_t index(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> (64 - bits_)); }
  int bits_ = 4;
  std::vector<Slot> slots_;
};


}  // namespace

const std::string& byte_to_unicode(uint8_t byte) { return alphabet().to_unicode[byte]; }

struct Tokenizer::Impl {
  StringMap<int32_t> bytes_to_id;   // model vocabulary, keys as raw bytes
  StringMap<int32_t> token_to_id;   // every token as tokenizer.json spells it (added tokens too)
  std::vector<std::string> id_token;  // id -> tokenizer.json spelling ("" for holes)
  std::vector<std::string> id_bytes;  // id -> raw bytes
  std::vector<uint8_t> id_special;    // 1 for added tokens marked special
  std::vector<uint8_t> id_valid;
  size_t id_limit = size_t{1} << 30;  // ids below it (from_json: twice the tokens the file defines, plus 1024)
  std::array<int32_t, 256> byte_id{};
  MergeTable merges;
  bool ignore_merges = false;

  StringMap<int32_t> added;            // added-token content -> id
  std::vector<size_t> added_lengths;   // distinct lengths, longest first
  std::string added_first_bytes;       // the bytes an added token can start with

  pcre2_code* re = nullptr;
  int32_t bos = -1, eos = -1, eot = -1, start_header = -1, end_header = -1;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;
  static constexpr size_t kMaxCache = 1 << 18;

  ~Impl() {
    if (re) pcre2_code_free(re);
  }

  void check_id(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= id_valid.size() || !id_valid[static_cast<size_t>(id)])
      KILN_FAIL("tokenizer", "unknown token id {} (vocabulary size {})", id, id_valid.size());
  }

  void set_token(int32_t id, std::string token, std::string bytes, bool special) {
    KILN_CHECK(id >= 0 && static_cast<size_t>(id) < id_limit, "tokenizer",
               "token id {} is out of range: the file defines too few tokens for ids past {} (holes in the ids are "
               "allowed, but not ids beyond twice the token count plus 1024)", id, id_limit - 1);
    auto n = static_cast<size_t>(id) + 1;
    if (id_token.size() < n) {
      id_token.resize(n);
      id_bytes.resize(n);
      id_special.resize(n, 0);
      id_valid.resize(n, 0);
    }
    auto i = static_cast<size_t>(id);
    id_token[i] = std::move(token);
    id_bytes[i] = std::move(bytes);
    id_special[i] = special ? 1 : 0;
    id_valid[i] = 1;
  }

  void compile_regex(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                       PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_off, nullptr);
    if (!re) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(err, msg.data(), msg.size());
      KILN_FAIL("tokenizer", "split regex does not compile at offset {}: {}", err_off,
                reinterpret_cast<const char*>(msg.data()));
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);  // falls back to the interpreter where JIT is absent
  }

  // BPE of a short pre-token on the stack: keep each adjacent pair's rank, merge the lowest (leftmost
  // on ties, as the heap below does), refresh the two ranks next to it. O(n^2) scans, n <= kShort.
  static constexpr size_t kShort = 48;
  void bpe_short(std::string_view word, std::vector<int32_t>& out) const {
    constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
    std::array<int32_t, kShort> ids{}, ranks{}, news{};
    size_t n = word.size();
    for (size_t i = 0; i < n; ++i) ids[i] = byte_id[static_cast<unsigned char>(word[i])];
    auto rank_at = [&](size_t i) {
      const MergeInfo* m = merges.find(ids[i], ids[i + 1]);
      ranks[i] = m ? m->rank : kNone;
      news[i] = m ? m->new_id : -1;
    };
    for (size_t i = 0; i + 1 < n; ++i) rank_at(i);
    while (n > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < n; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == kNone) break;
      ids[best] = news[best];
      for (size_t i = best + 1; i + 1 < n; ++i) {
        ids[i] = ids[i + 1];
        ranks[i] = ranks[i + 1];
        news[i] = news[i + 1];
      }
      --n;
      if (best + 1 < n) rank_at(best);
      else ranks[best] = kNone;
      if (best > 0) rank_at(best - 1);
    }
    out.insert(out.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n));
  }

  // BPE of one pre-token (raw bytes, at least 2) by merge rank: a linked list of symbols and a heap of
  // candidate pairs ordered by (rank, position), as Hugging Face's Word::merge_all does.
  void bpe(std::string_view word, std::vector<int32_t>& out) const {
    if (word.size() <= kShort) {
      bpe_short(word, out);
      return;
    }
    struct Sym {
      int32_t id, prev, next;
    };
    struct Cand {
      int32_t rank, pos, new_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    auto n = static_cast<int32_t>(word.size());
    std::vector<Sym> syms(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i)
      syms[static_cast<size_t>(i)] = {byte_id[static_cast<unsigned char>(word[static_cast<size_t>(i)])], i - 1,
                                      i + 1 < n ? i + 1 : -1};
    std::priority_queue<Cand, std::vector<Cand>, std::greater<>> heap;
    auto push = [&](int32_t pos) {
      const Sym& s = syms[static_cast<size_t>(pos)];
      if (s.next < 0) return;
      const MergeInfo* m = merges.find(s.id, syms[static_cast<size_t>(s.next)].id);
      if (m) heap.push({m->rank, pos, m->new_id});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      Sym& s = syms[static_cast<size_t>(c.pos)];
      if (s.id < 0 || s.next < 0) continue;
      Sym& r = syms[static_cast<size_t>(s.next)];
      const MergeInfo* m = merges.find(s.id, r.id);
      if (!m || m->new_id != c.new_id) continue;
      s.id = c.new_id;
      r.id = -1;
      s.next = r.next;
      if (s.next >= 0) syms[static_cast<size_t>(s.next)].prev = c.pos;
      if (s.prev >= 0) push(s.prev);
      push(c.pos);
    }
    for (int32_t i = 0; i >= 0; i = syms[static_cast<size_t>(i)].next) out.push_back(syms[static_cast<size_t>(i)].id);
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (word.size() == 1) {
      out.push_back(byte_id[static_cast<unsigned char>(word[0])]);
      return;
    }
    if (ignore_merges) {
      auto it = bytes_to_id.find(word);
      if (it != bytes_to_id.end()) {
        out.push_back(it->second);
        return;
      }
    }
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      auto it = cache.find(std::string(word));
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    size_t start = out.size();
    bpe(word, out);
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kMaxCache) cache.clear();
    cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(start), out.end()));
  }

  // Text without special tokens: split by the regex (bytes no match covers, e.g. invalid UTF-8, form
  // pre-tokens of their own, as Split's "Isolated" behaviour keeps gaps), then BPE per piece.
  void encode_text(std::string_view text, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re, nullptr);
    pcre2_match_context* mctx = nullptr;
    pcre2_jit_stack* jit_stack = nullptr;
    auto cleanup = [&] {
      pcre2_match_data_free(md);
      if (mctx) pcre2_match_context_free(mctx);
      if (jit_stack) pcre2_jit_stack_free(jit_stack);
    };
    auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0;
    try {
      while (pos < text.size()) {
        int rc = pcre2_match(re, subject, text.size(), pos, 0, md, mctx);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !jit_stack) {  // very long runs: retry with a big stack
          mctx = pcre2_match_context_create(nullptr);
          jit_stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
          pcre2_jit_stack_assign(mctx, nullptr, jit_stack);
          continue;
        }
        if (rc == PCRE2_ERROR_NOMATCH) {
          encode_word(text.substr(pos), out);
          break;
        }
        if (rc < 0) {
          std::array<PCRE2_UCHAR, 256> msg{};
          pcre2_get_error_message(rc, msg.data(), msg.size());
          KILN_FAIL("tokenizer", "split regex failed at byte {}: {}", pos, reinterpret_cast<const char*>(msg.data()));
        }
        PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], e = ov[1];
        if (s > pos) encode_word(text.substr(pos, s - pos), out);
        if (e <= s) e = s + 1;  // an empty match (the Llama 3 regex has none): take one byte
        encode_word(text.substr(s, e - s), out);
        pos = e;
      }
    } catch (...) {
      cleanup();
      throw;
    }
    cleanup();
  }

  void encode(std::string_view text, bool parse_special, std::vector<int32_t>& out) const {
    if (!parse_special || added.empty()) {
      encode_text(text, out);
      return;
    }
    size_t seg = 0, pos = 0;
    while (true) {
      size_t i = text.find_first_of(added_first_bytes, pos);
      if (i == std::string_view::npos) break;
      int32_t id = -1;
      size_t len = 0;
      for (size_t l : added_lengths) {  // leftmost-longest, as Hugging Face's matcher
        if (i + l > text.size()) continue;
        auto it = added.find(text.substr(i, l));
        if (it != added.end()) {
          id = it->second;
          len = l;
          break;
        }
      }
      if (id < 0) {
        pos = i + 1;
        continue;
      }
      encode_text(text.substr(seg, i - seg), out);
      out.push_back(id);
      seg = pos = i + len;
    }
    encode_text(text.substr(seg), out);
  }
};

std::string trim_chat_content(std::string_view s) {
  const char* ws = " \t\n\r\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(ws);
  return std::string(s.substr(b, e - b + 1));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  const std::string text = read_file(path, "tokenizer");
  try {
    return from_json(text);
  } catch (const Error& e) {
    throw Error(fmt::format("{} (in {})", e.what(), path));
  }
}

namespace {

// A token id from tokenizer.json: a JSON integer in [0, 2^30).
int32_t token_id(const json& v) {
  const std::optional<int64_t> id = json_int(v, 0, (int64_t{1} << 30) - 1);
  KILN_CHECK(id, "tokenizer", "token id must be an integer in [0, 2^30), found {}", json_shown(v));
  return static_cast<int32_t>(*id);
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) KILN_FAIL("tokenizer", "malformed JSON: expected a tokenizer.json object");
  auto impl = std::make_unique<Impl>();
  try {
    const json& model = j.at("model");
    std::string type = model.value("type", std::string("BPE"));
    KILN_CHECK(type == "BPE", "tokenizer", "expected a BPE model, found {:?}", type);
    impl->ignore_merges = model.value("ignore_merges", false);
    // The id tables are dense: a few tokens with ids near 2^30 would make gigabytes of them from a tiny file.
    const size_t added_count = j.contains("added_tokens") ? j["added_tokens"].size() : 0;
    impl->id_limit = std::min(impl->id_limit, 2 * (model.at("vocab").size() + added_count) + 1024);

    // Vocabulary.
    for (const auto& [token, idj] : model.at("vocab").items()) {
      const int32_t id = token_id(idj);
      std::string bytes = token_to_bytes(token);
      impl->bytes_to_id[bytes] = id;
      impl->token_to_id[token] = id;
      impl->set_token(id, token, std::move(bytes), false);
    }
    for (int b = 0; b < 256; ++b) {
      auto it = impl->bytes_to_id.find(std::string(1, static_cast<char>(b)));
      KILN_CHECK(it != impl->bytes_to_id.end(), "tokenizer", "byte-level vocabulary lacks byte {}", b);
      impl->byte_id[static_cast<size_t>(b)] = it->second;
    }

    // Merges: "a b" strings (older files) or ["a", "b"] pairs; rank = position.
    const json& merges = model.at("merges");
    std::vector<std::pair<uint64_t, MergeInfo>> table;
    table.reserve(merges.size());
    int32_t rank = 0;
    for (const json& m : merges) {
      std::string a, b;
      if (m.is_string()) {
        const auto& s = m.get_ref<const std::string&>();
        size_t sp = s.find(' ');
        KILN_CHECK(sp != std::string::npos, "tokenizer", "merge {:?} has no space", s);
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        a = m.at(0).get<std::string>();
        b = m.at(1).get<std::string>();
      }
      auto ia = impl->token_to_id.find(a), ib = impl->token_to_id.find(b), ic = impl->token_to_id.find(a + b);
      KILN_CHECK(ia != impl->token_to_id.end() && ib != impl->token_to_id.end() && ic != impl->token_to_id.end(),
                 "tokenizer", "merge ({:?}, {:?}) refers to a token outside the vocabulary", a, b);
      table.emplace_back(pair_key(ia->second, ib->second), MergeInfo{rank++, ic->second});
    }
    impl->merges.build(table);

    // Added (special) tokens.
    if (j.contains("added_tokens")) {
      for (const json& t : j.at("added_tokens")) {
        const int32_t id = token_id(t.at("id"));
        auto content = t.at("content").get<std::string>();
        KILN_CHECK(!content.empty(), "tokenizer", "added token {} is empty", id);
        bool special = t.value("special", false);
        impl->added[content] = id;
        impl->token_to_id[content] = id;
        impl->set_token(id, content, content, special);
        if (impl->added_first_bytes.find(content[0]) == std::string::npos) impl->added_first_bytes += content[0];
        if (std::find(impl->added_lengths.begin(), impl->added_lengths.end(), content.size()) ==
            impl->added_lengths.end())
          impl->added_lengths.push_back(content.size());
      }
      std::sort(impl->added_lengths.rbegin(), impl->added_lengths.rend());
    }

    // Pre-tokenizer: the Split regex (inside a Sequence with ByteLevel, or alone).
    std::string pattern;
    std::vector<const json*> pres;
    if (j.contains("pre_tokenizer") && j["pre_tokenizer"].is_object()) {
      const json& p = j["pre_tokenizer"];
      if (p.value("type", "") == "Sequence")
        for (const json& q : p.at("pretokenizers")) pres.push_back(&q);
      else
        pres.push_back(&p);
    }
    for (const json* p : pres) {
      if (p->value("type", "") == "Split") {
        KILN_CHECK(p->value("behavior", "Isolated") == "Isolated" && !p->value("invert", false), "tokenizer",
                   "expected a Split pre-tokenizer with behavior Isolated, found {}", p->dump());
        pattern = p->at("pattern").value("Regex", "");
      } else if (p->value("type", "") == "ByteLevel") {
        KILN_CHECK(!p->value("add_prefix_space", false) && !p->value("use_regex", true),
                   "tokenizer", "ByteLevel pre-tokenizer with its own GPT-2 regex or prefix space is not supported");
      }
    }
    KILN_CHECK(!pattern.empty(), "tokenizer", "expected a Split pre-tokenizer with a regex, found none");
    impl->compile_regex(pattern);
  } catch (const json::exception& e) {
    KILN_FAIL("tokenizer", "malformed tokenizer.json: {}", e.what());
  }

  auto find = [&](const char* s) {
    auto it = impl->added.find(std::string_view(s));
    return it == impl->added.end() ? -1 : it->second;
  };
  impl->bos = find("<|begin_of_text|>");
  impl->eos = find("<|end_of_text|>");
  impl->eot = find("<|eot_id|>");
  impl->start_header = find("<|start_header_id|>");
  impl->end_header = find("<|end_header_id|>");
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos) {
    KILN_CHECK(impl_->bos >= 0, "tokenizer", "add_bos needs a <|begin_of_text|> token, found none");
    out.push_back(impl_->bos);
  }
  impl_->encode(text, parse_special, out);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    impl_->check_id(id);
    auto i = static_cast<size_t>(id);
    if (skip_special && impl_->id_special[i]) continue;
    out += impl_->id_bytes[i];
  }
  return out;
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  return it == impl_->token_to_id.end() ? -1 : it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  impl_->check_id(id);
  return impl_->id_token[static_cast<size_t>(id)];
}

std::string Tokenizer::id_to_bytes(int32_t id) const {
  impl_->check_id(id);
  return impl_->id_bytes[static_cast<size_t>(id)];
}

bool Tokenizer::is_special(int32_t id) const {
  impl_->check_id(id);
  return impl_->id_special[static_cast<size_t>(id)] != 0;
}

int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_valid.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::eot_id() const { return impl_->eot; }

std::string Tokenizer::apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0) out += "<|begin_of_text|>";
    out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + trim_chat_content(messages[i].content) +
           "<|eot_id|>";
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::vector<int32_t> Tokenizer::encode_chat(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  const Impl& m = *impl_;
  KILN_CHECK(m.bos >= 0 && m.eot >= 0 && m.start_header >= 0 && m.end_header >= 0, "tokenizer",
             "the chat format needs <|begin_of_text|>, <|start_header_id|>, <|end_header_id|> and <|eot_id|>, "
             "found some missing");
  std::vector<int32_t> out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0) out.push_back(m.bos);
    out.push_back(m.start_header);
    m.encode_text(messages[i].role, out);
    out.push_back(m.end_header);
    m.encode_text("\n\n" + trim_chat_content(messages[i].content), out);
    out.push_back(m.eot);
  }
  if (add_generation_prompt) {
    out.push_back(m.start_header);
    m.encode_text("assistant", out);
    out.push_back(m.end_header);
    m.encode_text("\n\n", out);
  }
  return out;
}

}  // namespace kiln::data

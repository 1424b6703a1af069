// Documents: plain-text and JSONL readers (format detected per JSONL line, errors naming file:line),
// tokenisation with bos/eos or the Llama 3 chat format and per-token loss masks, the seeded held-out split.
#include "data/dataset.h"
#include "core/file_io.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "data/packing.h"
#include "data/utf8.h"

namespace kiln::data {

namespace {

using json = nlohmann::json;

constexpr const char* kOp = "dataset";
constexpr uint64_t kSplitStream = 0x53504c4954ull;  // "SPLIT": keeps the split apart from the shuffles

bool is_blank(std::string_view s) { return s.find_first_not_of(" \t\r\n\v\f") == std::string_view::npos; }

// Calls fn(line, line_number) for each line (without "\n" and a trailing "\r"), numbered from 1.
template <class Fn>
void for_each_line(std::string_view content, Fn&& fn) {
  size_t pos = 0;
  int64_t number = 1;
  while (pos < content.size()) {
    size_t end = content.find('\n', pos);
    if (end == std::string_view::npos) end = content.size();
    std::string_view line = content.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    fn(line, number++);
    pos = end + 1;
  }
}

const char* type_name(const json& j) { return j.type_name(); }

std::string get_string(const json& obj, const char* field, std::string_view where) {
  const json& v = obj.at(field);
  if (!v.is_string()) KILN_FAIL(kOp, "{}: field \"{}\" must be a string, found {}", where, field, type_name(v));
  return v.get<std::string>();
}

bool known_role(std::string_view role) {
  return role == "system" || role == "user" || role == "assistant" || role == "ipython" || role == "tool";
}

RawDocument parse_jsonl_object(const json& j, const std::string& where) {
  if (!j.is_object()) KILN_FAIL(kOp, "{}: expected a JSON object, found {}", where, type_name(j));
  bool has_text = j.contains("text"), has_messages = j.contains("messages");
  bool has_pc = j.contains("prompt") || j.contains("completion");
  int kinds = int(has_text) + int(has_messages) + int(has_pc);
  if (kinds == 0) {
    std::vector<std::string> keys;
    for (const auto& [k, v] : j.items()) keys.push_back(k);
    KILN_FAIL(kOp, "{}: expected a \"text\", \"prompt\"/\"completion\" or \"messages\" field, found keys {}", where,
              keys);
  }
  if (kinds > 1)
    KILN_FAIL(kOp, "{}: expected one of \"text\", \"prompt\"/\"completion\" or \"messages\", found several", where);
  RawDocument doc;
  doc.origin = where;
  if (has_text) {
    doc.kind = RawDocument::Kind::text;
    doc.text = get_string(j, "text", where);
  } else if (has_pc) {
    doc.kind = RawDocument::Kind::prompt_completion;
    if (!j.contains("prompt") || !j.contains("completion"))
      KILN_FAIL(kOp, "{}: expected both \"prompt\" and \"completion\", found only \"{}\"", where,
                j.contains("prompt") ? "prompt" : "completion");
    doc.prompt = get_string(j, "prompt", where);
    doc.completion = get_string(j, "completion", where);
  } else {
    doc.kind = RawDocument::Kind::chat;
    const json& msgs = j.at("messages");
    if (!msgs.is_array()) KILN_FAIL(kOp, "{}: field \"messages\" must be an array, found {}", where, type_name(msgs));
    if (msgs.empty()) KILN_FAIL(kOp, "{}: field \"messages\" is empty", where);
    for (size_t i = 0; i < msgs.size(); ++i) {
      const json& m = msgs[i];
      std::string at = fmt::format("{}: messages[{}]", where, i);
      if (!m.is_object()) KILN_FAIL(kOp, "{}: expected an object, found {}", at, type_name(m));
      if (!m.contains("role") || !m.contains("content"))
        KILN_FAIL(kOp, "{}: expected \"role\" and \"content\" fields, found {}", at, m.dump());
      ChatMessage msg{get_string(m, "role", at), get_string(m, "content", at)};
      if (!known_role(msg.role))
        KILN_FAIL(kOp, "{}: unknown role {:?} (expected system, user, assistant, ipython or tool)", at, msg.role);
      doc.messages.push_back(std::move(msg));
    }
  }
  return doc;
}

std::vector<RawDocument> load_file(const std::filesystem::path& path, const TextOptions& options) {
  std::string content = read_file(path.string(), kOp);
  check_text(content, path.string());
  if (path.extension() == ".jsonl") return parse_jsonl(content, path.string());
  if (path.extension() == ".json") return parse_json(content, path.string());
  return parse_text(content, path.string(), options);
}

void append_encoded(const Tokenizer& tok, std::string_view text, uint8_t loss, Document& out) {
  std::vector<int32_t> ids = tok.encode(text, /*add_bos=*/false, /*parse_special=*/false);
  out.ids.insert(out.ids.end(), ids.begin(), ids.end());
  out.loss.insert(out.loss.end(), ids.size(), loss);
}

void append_token(int32_t id, uint8_t loss, Document& out) {
  out.ids.push_back(id);
  out.loss.push_back(loss);
}

// encode_chat's ids; the mask walks the same pieces: bos, then per message start_header, role,
// end_header, "\n\n" + trimmed content, eot. Assistant contents (after the "\n\n") and their eot count.
Document tokenize_chat(const Tokenizer& tok, const RawDocument& doc) {
  Document out;
  out.ids = tok.encode_chat(doc.messages, /*add_generation_prompt=*/false);
  out.loss.assign(out.ids.size(), 0);
  std::vector<int32_t> newlines = tok.encode("\n\n", false, false);
  size_t pos = 1;  // after bos
  for (const ChatMessage& m : doc.messages) {
    size_t head = 2 + tok.encode(m.role, false, false).size();
    std::vector<int32_t> body = tok.encode("\n\n" + trim_chat_content(m.content), false, false);
    bool led = body.size() >= newlines.size() && std::equal(newlines.begin(), newlines.end(), body.begin());
    size_t skip = led ? newlines.size() : 0;
    size_t end = pos + head + body.size() + 1;
    KILN_CHECK(end <= out.ids.size(), kOp, "{}: chat mask walks past the encoded chat ({} > {} tokens)", doc.origin,
               end, out.ids.size());
    if (m.role == "assistant") std::fill(out.loss.begin() + static_cast<std::ptrdiff_t>(pos + head + skip),
                                         out.loss.begin() + static_cast<std::ptrdiff_t>(end), uint8_t{1});
    pos = end;
  }
  KILN_CHECK(pos == out.ids.size(), kOp, "{}: chat mask covers {} of {} tokens", doc.origin, pos, out.ids.size());
  return out;
}

}  // namespace

std::vector<RawDocument> parse_text(std::string_view content, std::string_view name, const TextOptions& options) {
  std::vector<RawDocument> docs;
  auto emit = [&](std::string text, int64_t line) {
    if (is_blank(text)) return;
    RawDocument d;
    d.kind = RawDocument::Kind::text;
    d.text = std::move(text);
    d.origin = fmt::format("{}:{}", name, line);
    docs.push_back(std::move(d));
  };
  if (options.split == TextSplit::whole_file) {
    emit(std::string(content), 1);
    return docs;
  }
  KILN_CHECK(options.split != TextSplit::separator || !options.separator.empty(), kOp,
             "a non-empty separator for TextSplit::separator, found \"\"");
  std::string current;
  int64_t first = 0;
  bool open = false;
  for_each_line(content, [&](std::string_view line, int64_t number) {
    bool boundary = options.split == TextSplit::blank_lines ? is_blank(line) : line == options.separator;
    if (boundary) {
      if (open) emit(std::move(current), first);
      current.clear();
      open = false;
      return;
    }
    if (open) current += '\n';
    else first = number;
    current += line;
    open = true;
  });
  if (open) emit(std::move(current), first);
  return docs;
}

std::vector<RawDocument> parse_jsonl(std::string_view content, std::string_view name) {
  std::vector<RawDocument> docs;
  for_each_line(content, [&](std::string_view line, int64_t number) {
    if (is_blank(line)) return;
    std::string where = fmt::format("{}:{}", name, number);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number beyond double
      KILN_FAIL(kOp, "{}: malformed JSON: {}", where, e.what());
    }
    docs.push_back(parse_jsonl_object(j, where));
  });
  return docs;
}

std::vector<RawDocument> parse_json(std::string_view content, std::string_view name) {
  json whole;
  try {
    whole = json::parse(content);
  } catch (const json::exception&) {
    return parse_jsonl(content, name);  // not one JSON value: JSON Lines, as `datasets.to_json` writes
  }
  std::vector<RawDocument> docs;
  if (whole.is_object()) {
    docs.push_back(parse_jsonl_object(whole, std::string(name)));
    return docs;
  }
  if (!whole.is_array())
    KILN_FAIL(kOp, "{}: expected a JSON array of objects, one object, or one object per line (JSON Lines), found {}",
              name, type_name(whole));
  for (size_t i = 0; i < whole.size(); ++i) docs.push_back(parse_jsonl_object(whole[i], fmt::format("{}: [{}]", name, i)));
  return docs;
}

void check_text(std::string_view content, std::string_view name) {
  const size_t nul = content.find('\0');
  const size_t bad = std::min(nul, find_invalid_utf8(content));
  if (bad == std::string_view::npos) return;
  size_t line = 1 + static_cast<size_t>(std::count(content.begin(), content.begin() + static_cast<std::ptrdiff_t>(bad), '\n'));
  KILN_FAIL(kOp, "{}: not UTF-8 text: {} at byte {} (line {}); is it a binary file? Give text, JSONL or JSON "
            "(convert other encodings to UTF-8 first)",
            name, bad == nul ? "a NUL byte" : fmt::format("an invalid UTF-8 byte 0x{:02X}", static_cast<unsigned char>(content[bad])),
            bad, line);
}

std::vector<RawDocument> load_documents(const std::string& path, const TextOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) KILN_FAIL(kOp, "no such file or directory {:?}", path);
  if (!fs::is_directory(st)) return load_file(path, options);
  std::vector<fs::path> files;
  for (auto it = fs::recursive_directory_iterator(path); it != fs::recursive_directory_iterator(); ++it) {
    std::string leaf = it->path().filename().string();
    if (!leaf.empty() && leaf[0] == '.') {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file()) files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  std::vector<RawDocument> docs;
  for (const fs::path& f : files) {
    std::vector<RawDocument> part = load_file(f, options);
    docs.insert(docs.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
  }
  return docs;
}

Document tokenize_document(const Tokenizer& tok, const RawDocument& doc) {
  if (doc.kind == RawDocument::Kind::chat) return tokenize_chat(tok, doc);
  KILN_CHECK(tok.bos_id() >= 0 && tok.eos_id() >= 0, kOp,
             "a tokenizer with <|begin_of_text|> and <|end_of_text|>, found bos {} eos {}", tok.bos_id(), tok.eos_id());
  Document out;
  append_token(tok.bos_id(), 0, out);
  if (doc.kind == RawDocument::Kind::text) {
    append_encoded(tok, doc.text, 1, out);
  } else {
    append_encoded(tok, doc.prompt, 0, out);
    append_encoded(tok, doc.completion, 1, out);
  }
  append_token(tok.eos_id(), 1, out);
  return out;
}

std::vector<Document> tokenize_documents(const Tokenizer& tok, const std::vector<RawDocument>& docs) {
  std::vector<Document> out;
  out.reserve(docs.size());
  for (const RawDocument& d : docs) out.push_back(tokenize_document(tok, d));
  return out;
}

Split split_indices(int64_t n, const SplitOptions& options) {
  KILN_CHECK(n >= 0, kOp, "a document count >= 0, found {}", n);
  int64_t k = 0;
  if (options.count >= 0) {
    KILN_CHECK(options.count <= n, kOp, "an eval count <= the {} documents, found {}", n, options.count);
    k = options.count;
  } else {
    KILN_CHECK(options.fraction >= 0.0 && options.fraction < 1.0, kOp, "an eval fraction in [0, 1), found {}",
               options.fraction);
    k = static_cast<int64_t>(std::llround(options.fraction * static_cast<double>(n)));
    if (options.fraction > 0.0 && n >= 2) k = std::clamp<int64_t>(k, 1, n - 1);
  }
  std::vector<int64_t> perm = seeded_permutation(n, mix_seed(options.seed, kSplitStream));
  Split s;
  s.eval.assign(perm.begin(), perm.begin() + k);
  s.train.assign(perm.begin() + k, perm.end());
  std::sort(s.eval.begin(), s.eval.end());
  std::sort(s.train.begin(), s.train.end());
  return s;
}

std::vector<Document> select_documents(const std::vector<Document>& docs, const std::vector<int64_t>& indices) {
  std::vector<Document> out;
  out.reserve(indices.size());
  for (int64_t i : indices) {
    KILN_CHECK(i >= 0 && i < static_cast<int64_t>(docs.size()), kOp, "a document index in [0, {}), found {}",
               docs.size(), i);
    out.push_back(docs[static_cast<size_t>(i)]);
  }
  return out;
}

}  // namespace kiln::data

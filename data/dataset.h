// Training documents: reading plain text (one document per file, or split on blank lines or a separator
// line), JSON arrays and JSONL (`text`, `prompt`/`completion` or chat `messages`, detected per line), tokenising them
// with bos/eos (or <|eot_id|> for chat) and a per-token loss mask, and the seeded held-out split.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace kiln::data {

// How a plain-text file becomes documents.
enum class TextSplit {
  whole_file,   // the file is one document
  blank_lines,  // documents are separated by one or more blank (whitespace-only) lines
  separator,    // documents are separated by lines equal to TextOptions::separator (fortune files: "%")
};

struct TextOptions {
  TextSplit split = TextSplit::whole_file;
  std::string separator = "%";  // for TextSplit::separator: a line whose text (sans "\r") equals it
};

// One document before tokenisation. `origin` names where it came from ("file:line") for error messages.
struct RawDocument {
  enum class Kind { text, prompt_completion, chat };
  Kind kind = Kind::text;
  std::string text;                   // Kind::text
  std::string prompt, completion;     // Kind::prompt_completion
  std::vector<ChatMessage> messages;  // Kind::chat: roles system, user, assistant, ipython or tool
  std::string origin;
};

// Plain text. Documents that are empty or whitespace-only are dropped. `name` is used in `origin`.
std::vector<RawDocument> parse_text(std::string_view content, std::string_view name, const TextOptions& options = {});
// JSONL, the format detected per line: {"text": s}, {"prompt": s, "completion": s} or
// {"messages": [{"role": s, "content": s}, ...]}. Blank lines are skipped. Bad JSON, a missing field, a
// wrong type or an unknown role throws kiln::Error("[dataset] name:line: ...").
std::vector<RawDocument> parse_jsonl(std::string_view content, std::string_view name);
// *.json: one JSON value (an array of such objects, or one object), else JSON Lines (Hugging Face
// `datasets.to_json` writes one object per line into a .json file). Errors name file:line or file: [i].
std::vector<RawDocument> parse_json(std::string_view content, std::string_view name);
// kiln::Error "[dataset] name: not UTF-8 text: ..." naming the first NUL byte or invalid UTF-8 byte (and
// its line): a binary file is never trained on as text.
void check_text(std::string_view content, std::string_view name);
// Reads a file: *.jsonl as JSONL, *.json by parse_json, anything else as plain text with `options`; each
// must be UTF-8 text without NUL bytes (check_text). A directory reads every regular file under it
// (recursively, sorted by path, hidden files skipped). Missing path: kiln::Error.
std::vector<RawDocument> load_documents(const std::string& path, const TextOptions& options = {});

// A tokenised document: ids[i] is a token, loss[i] = 1 when predicting ids[i] counts in the loss
// (the label at the position before it), 0 when it is masked out (-100).
struct Document {
  std::vector<int32_t> ids;   // (n,)
  std::vector<uint8_t> loss;  // (n,)
};

// text:       <|begin_of_text|> text <|end_of_text|>; every token but bos in the loss.
// prompt/completion: <|begin_of_text|> prompt completion <|end_of_text|>; bos and prompt masked, the
//             completion and eos in the loss (prompt and completion are encoded separately, as written).
// chat:       Tokenizer::encode_chat(messages, false) (ends with <|eot_id|>); only assistant contents and
//             their <|eot_id|> in the loss; headers, system/user/tool turns and bos masked.
// Special-token text inside documents is encoded as ordinary text (it cannot forge a boundary).
Document tokenize_document(const Tokenizer& tok, const RawDocument& doc);
std::vector<Document> tokenize_documents(const Tokenizer& tok, const std::vector<RawDocument>& docs);

// Held-out split: `count` documents when count >= 0, else round(fraction * n) (at least 1 when fraction > 0
// and n >= 2, never all of them then), chosen by a seeded permutation. Both parts keep the input order;
// the same inputs and seed give the same split on every machine.
struct SplitOptions {
  double fraction = 0.0;
  int64_t count = -1;
  uint64_t seed = 0;
};
struct Split {
  std::vector<int64_t> train;  // indices into the documents, ascending
  std::vector<int64_t> eval;   // indices into the documents, ascending, disjoint from train
};
Split split_indices(int64_t n_documents, const SplitOptions& options);
// The documents at `indices`, in that order (bad index: kiln::Error).
std::vector<Document> select_documents(const std::vector<Document>& docs, const std::vector<int64_t>& indices);

}  // namespace kiln::data

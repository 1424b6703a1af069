// The Llama 3 tokenizer: byte-level BPE loaded from a Hugging Face tokenizer.json (Split regex
// pre-tokenizer through PCRE2, GPT-2 byte-to-unicode mapping, merges by rank, special tokens matched
// before splitting), decode, id <-> token lookups, and the Llama 3 chat format.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::data {

// One chat turn: role is "system", "user", "assistant" (or any header text), content is plain text.
struct ChatMessage {
  std::string role;
  std::string content;
};

// Immutable after loading; encode/decode may be called from several threads (the per-word BPE cache,
// bounded in size, is guarded by a mutex).
// What the chat template does to a message's content: strips ASCII whitespace at both ends.
std::string trim_chat_content(std::string_view s);

class Tokenizer {
 public:
  // Loads tokenizer.json. Throws kiln::Error("[tokenizer] ...") on a missing file, malformed JSON or
  // an unsupported model (only BPE with a byte-level pre-tokenizer/decoder is read).
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json(std::string_view json_text);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text -> ids. With parse_special, special tokens written in the text ("<|eot_id|>") become their
  // ids; without, they are ordinary text. add_bos prepends <|begin_of_text|>. Any bytes are accepted:
  // invalid UTF-8 still maps through the byte-level alphabet, and decode gives the same bytes back.
  std::vector<int32_t> encode(std::string_view text, bool add_bos = false, bool parse_special = true) const;
  // Ids -> bytes (special tokens as their text unless skip_special). Unknown id: kiln::Error.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Token strings are as tokenizer.json spells them (byte-level alphabet, "Ġhello").
  // token_to_id returns -1 for a token not in the vocabulary; id_to_token throws for a bad id.
  int32_t token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;
  // The raw bytes a token decodes to.
  std::string id_to_bytes(int32_t id) const;
  bool is_special(int32_t id) const;
  int64_t vocab_size() const;  // highest id + 1, added tokens included

  int32_t bos_id() const;  // <|begin_of_text|>
  int32_t eos_id() const;  // <|end_of_text|>
  int32_t eot_id() const;  // <|eot_id|> (end of a chat turn)

  // The text the Llama 3.1 tokenizer_config.json chat template produces: <|begin_of_text|> first,
  // then per message "<|start_header_id|>" role "<|end_header_id|>\n\n" trim(content) "<|eot_id|>",
  // then, with add_generation_prompt, "<|start_header_id|>assistant<|end_header_id|>\n\n".
  static std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt);
  // The ids of that text. Header tokens are special ids; role and content are encoded as text, so a
  // special token written inside a message cannot forge a turn boundary (for ordinary content the
  // ids equal encode(apply_chat_template(...))).
  std::vector<int32_t> encode_chat(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The GPT-2 byte-level alphabet: each byte 0..255 as one printable code point, UTF-8 encoded.
const std::string& byte_to_unicode(uint8_t byte);

}  // namespace kiln::data

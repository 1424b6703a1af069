// Fuzz target: tokenizer.json through data::Tokenizer::from_json; a tokenizer that loads then encodes
// and decodes a fixed text (special tokens, digits, accents, invalid UTF-8), looks up every id and
// applies the chat template.
#include <cstddef>
#include <cstdint>

#include "data/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::data::Tokenizer tok = kiln::data::Tokenizer::from_json(kiln::fuzz::as_text(data, size));
    const std::string text = "Hello, world!<|eot_id|> 12345 h\xc3\xa9llo \xff\xfe  \n\ttabs's";
    for (bool special : {false, true}) {
      const std::vector<int32_t> ids = tok.encode(text, false, special);
      (void)tok.decode(ids, false);
      (void)tok.decode(ids, true);
    }
    const int64_t n = tok.vocab_size();
    for (int64_t id = 0; id < n && id < 512; ++id) {
      const auto i = static_cast<int32_t>(id);
      if (tok.token_to_id(tok.id_to_token(i)) < 0) continue;
      (void)tok.id_to_bytes(i);
      (void)tok.is_special(i);
    }
    const std::vector<kiln::data::ChatMessage> chat{{"user", "Hi there"}, {"assistant", "Hello!"}};
    (void)tok.encode_chat(chat, true);
  });
  return 0;
}

// UTF-8 validity for text that comes from outside or from byte-level tokens: finding the first invalid
// byte (binary files given as training text), replacing invalid sequences with U+FFFD, and a stream that
// holds back a character split across tokens until its last byte arrives.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kiln::data {

// "\xEF\xBF\xBD", U+FFFD REPLACEMENT CHARACTER.
inline constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";

// The offset of the first byte that does not start a complete, valid UTF-8 sequence (overlong forms,
// surrogates and code points past U+10FFFF are invalid; so is a sequence cut off by the end), or
// std::string_view::npos when all of `s` is valid.
size_t find_invalid_utf8(std::string_view s);

// The code point of the valid sequence starting at s[i], with i moved past it; -1 (i unchanged) when
// the bytes at s[i] do not start a complete, valid sequence.
int32_t next_code_point(std::string_view s, size_t& i);

// `s` with each maximal invalid subsequence replaced by one U+FFFD (the WHATWG/Unicode "substitution of
// maximal subparts" practice); valid text is returned unchanged.
std::string to_valid_utf8(std::string_view s);

// Text arriving in pieces (a token's bytes at a time): push() returns the valid UTF-8 complete so far,
// invalid bytes replaced by U+FFFD, and keeps an unfinished character (at most 3 bytes) for the next
// piece; finish() returns what is still held, as U+FFFD when it never completed.
class Utf8Stream {
 public:
  std::string push(std::string_view bytes);
  std::string finish();
  const std::string& pending() const { return pending_; }

 private:
  std::string pending_;
};

}  // namespace kiln::data

// UTF-8 checking and repair (see utf8.h): one decoder of a sequence's length and validity, following
// the well-formed byte sequences table of the Unicode standard (3.9, table 3-7).
#include "data/utf8.h"

namespace kiln::data {

namespace {

// What the bytes at s[i..] hold: a valid sequence of `length` bytes; an invalid subpart of `length`
// bytes (replace it by one U+FFFD); or, with `truncated`, a valid prefix the end of `s` cut off.
struct Sequence {
  size_t length = 1;
  bool valid = false;
  bool truncated = false;
};

Sequence read_sequence(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return {1, true, false};
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) need = 2;
  else if (b0 == 0xE0) need = 3, lo = 0xA0;
  else if (b0 >= 0xE1 && b0 <= 0xEC) need = 3;
  else if (b0 == 0xED) need = 3, hi = 0x9F;  // no surrogates
  else if (b0 >= 0xEE && b0 <= 0xEF) need = 3;
  else if (b0 == 0xF0) need = 4, lo = 0x90;
  else if (b0 >= 0xF1 && b0 <= 0xF3) need = 4;
  else if (b0 == 0xF4) need = 4, hi = 0x8F;  // not past U+10FFFF
  else return {1, false, false};             // a continuation byte, C0/C1 (overlong) or F5..FF
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return {k, false, true};
    const auto b = static_cast<unsigned char>(s[i + k]);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {k, false, false};
  }
  return {need, true, false};
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const Sequence q = read_sequence(s, i);
    if (!q.valid) return i;
    i += q.length;
  }
  return std::string_view::npos;
}

int32_t next_code_point(std::string_view s, size_t& i) {
  const Sequence q = read_sequence(s, i);
  if (!q.valid) return -1;
  const auto b0 = static_cast<unsigned char>(s[i]);
  int32_t cp = q.length == 1 ? b0 : b0 & (0x7F >> q.length);  // the lead byte's payload bits
  for (size_t k = 1; k < q.length; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += q.length;
  return cp;
}

std::string to_valid_utf8(std::string_view s) {
  if (find_invalid_utf8(s) == std::string_view::npos) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const Sequence q = read_sequence(s, i);
    if (q.valid) out.append(s.substr(i, q.length));
    else out.append(kReplacementCharacter);
    i += q.length;
  }
  return out;
}

std::string Utf8Stream::push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const Sequence q = read_sequence(pending_, i);
    if (q.truncated) break;  // wait for the rest of this character
    if (q.valid) out.append(pending_, i, q.length);
    else out.append(kReplacementCharacter);
    i += q.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8Stream::finish() {
  std::string out = pending_.empty() ? std::string() : to_valid_utf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace kiln::data

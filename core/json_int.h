// Integers from JSON that came from outside (config files, checkpoints, tokenizer.json): nlohmann's
// get<int64_t>() of a float such as 1e80 is undefined behaviour, so only JSON integers in range are taken.
// Header-only; included by .cpp files that already parse with nlohmann-json.
#pragma once
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/error.h"

namespace kiln {

// v as an int64 when it is a JSON integer in [lo, hi]; nullopt for a float, a non-number or a value out of range.
inline std::optional<int64_t> json_int(const nlohmann::json& v, int64_t lo = std::numeric_limits<int64_t>::min(),
                                       int64_t hi = std::numeric_limits<int64_t>::max()) {
  int64_t i = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    i = static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    i = v.get<int64_t>();
  } else {
    return std::nullopt;
  }
  if (i < lo || i > hi) return std::nullopt;
  return i;
}

// v as a uint64 when it is a non-negative JSON integer.
inline std::optional<uint64_t> json_uint(const nlohmann::json& v) {
  if (!v.is_number_unsigned()) return std::nullopt;
  return v.get<uint64_t>();
}

// What an error message shows of v: the value, or its type for an array or object.
inline std::string json_shown(const nlohmann::json& v) { return v.is_primitive() ? v.dump() : v.type_name(); }

// json_int(v), or a kiln::Error "[op] <what> must be an integer, found <v>".
inline int64_t need_json_int(const nlohmann::json& v, const char* op, const std::string& what) {
  const std::optional<int64_t> i = json_int(v);
  KILN_CHECK(i, op, "{} must be an integer, found {}", what, json_shown(v));
  return *i;
}

// json_uint(v), or a kiln::Error "[op] <what> must be a non-negative integer, found <v>".
inline uint64_t need_json_uint(const nlohmann::json& v, const char* op, const std::string& what) {
  const std::optional<uint64_t> u = json_uint(v);
  KILN_CHECK(u, op, "{} must be a non-negative integer, found {}", what, json_shown(v));
  return *u;
}

}  // namespace kiln

// kiln::Error, the one exception kiln throws on bad input, and KILN_CHECK, which formats messages
// as "[op] what was expected, what was found" (fmt syntax).
#pragma once
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>
#include <string>

namespace kiln {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kiln

#define KILN_CHECK(cond, op, ...)                                                              \
  do {                                                                                         \
    if (!(cond)) throw ::kiln::Error(fmt::format("[{}] {}", op, fmt::format(__VA_ARGS__))); \
  } while (0)

#define KILN_FAIL(op, ...) throw ::kiln::Error(fmt::format("[{}] {}", op, fmt::format(__VA_ARGS__)))

// Shared by the fuzz targets (tests/fuzz/*.cpp): a per-process scratch folder for parsers that read
// files, and the rule every target follows: kiln::Error is the expected answer to bad input; any other
// exception escapes (libFuzzer reports it as a crash; the [fuzz] replay in kiln_tests fails on it).
#pragma once
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "core/error.h"

namespace kiln::fuzz {

// <temp>/kiln_fuzz_<pid>/<name>; the folder is made on first use and reused for every input.
inline std::filesystem::path scratch(const std::string& name) {
  static const std::filesystem::path dir = [] {
    std::filesystem::path d = std::filesystem::temp_directory_path() / ("kiln_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir / name;
}

// Writes the bytes to `path` (truncating) and returns the path as a string.
inline std::string write_file(const std::filesystem::path& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  KILN_CHECK(out.good(), "fuzz", "cannot write the scratch file {}", path.string());
  return path.string();
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs `parse`; a kiln::Error (bad input, reported properly) is swallowed, anything else propagates.
template <typename F>
void expect_kiln_errors_only(F&& parse) {
  try {
    parse();
  } catch (const kiln::Error&) {
  }
}

}  // namespace kiln::fuzz

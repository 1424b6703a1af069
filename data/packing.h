// Packing tokenised documents into (B, T) batches: per epoch the documents, shuffled by seed + epoch,
// form one token stream cut into rows of T + 1 tokens (consecutive rows overlap by one token), labels
// shifted by one with masked tokens at -100; a DataPosition that saves and restores the exact place.
#pragma once
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "data/dataset.h"

namespace kiln::data {

inline constexpr int64_t kIgnoreIndex = -100;  // the label of a token out of the loss

struct Batch {
  Tensor input_ids;       // (B, T) i64
  Tensor labels;          // (B, T) i64, kIgnoreIndex where masked or padded
  int64_t n_loss_tokens;  // labels != kIgnoreIndex
};

// Deterministic on every machine: std::mt19937_64's sequence is fixed by the standard, and the draws
// below avoid the implementation-defined std::uniform_int_distribution / std::shuffle.
uint64_t mix_seed(uint64_t seed, uint64_t stream);         // splitmix64 of the pair: one seed per use
uint64_t bounded_draw(std::mt19937_64& rng, uint64_t n);   // uniform in [0, n) by rejection, n >= 1
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);  // Fisher-Yates over 0..n-1

// Where a PackedDataset is: the next row to read is `row` of epoch `epoch`. seed, seq_len and
// fingerprint (of the documents' ids and masks) let restore() refuse a position from other data.
struct DataPosition {
  int64_t epoch = 0;
  int64_t row = 0;
  uint64_t seed = 0;
  int64_t seq_len = 0;
  uint64_t fingerprint = 0;

  std::string to_json() const;
  static DataPosition from_json(std::string_view text);  // kiln::Error("[dataset] ...") when malformed
  bool operator==(const DataPosition&) const = default;
};

struct PackOptions {
  int64_t seq_len = 256;   // T
  int64_t batch_size = 8;  // B
  uint64_t seed = 0;
  bool shuffle = true;     // documents in a new seeded order each epoch; false: the given order always
  int64_t epochs = -1;     // stop after this many epochs; -1 loops forever
  int32_t pad_id = 0;      // input id after the stream's end in an epoch's last, partial row
};

class PackedDataset {
 public:
  // Throws kiln::Error("[dataset] ...") on seq_len < 1, batch_size < 1, epochs < -1, mismatched masks.
  PackedDataset(std::vector<Document> docs, PackOptions options);

  // The stream of one epoch has tokens_per_epoch() tokens (N); it gives ceil((N - 1) / T) rows: row r
  // holds stream[r*T, r*T + T + 1), the last one padded (inputs pad_id, labels kIgnoreIndex).
  int64_t tokens_per_epoch() const { return n_tokens_; }
  int64_t rows_per_epoch() const { return n_rows_; }
  const std::vector<Document>& documents() const { return docs_; }
  const PackOptions& options() const { return options_; }

  // The document order of an epoch (a permutation of 0..n-1; the identity without shuffle).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // Row r of an epoch: inputs = row[:-1], labels = row[1:] (kIgnoreIndex where masked). (T,) each.
  void read_row(int64_t epoch, int64_t row, int64_t* inputs, int64_t* labels) const;

  // The next B rows, crossing into the next epoch as needed; fewer than B at the end of the last epoch;
  // nullopt once the epochs are done, or at once when there is no row at all (fewer than 2 tokens).
  std::optional<Batch> next();
  bool done() const;

  DataPosition position() const;
  // The next batch after restore(p) equals the next batch after position() returned p.
  void restore(const DataPosition& p);

 private:
  void load_epoch(int64_t epoch) const;

  std::vector<Document> docs_;
  PackOptions options_;
  int64_t n_tokens_ = 0;
  int64_t n_rows_ = 0;
  uint64_t fingerprint_ = 0;
  int64_t epoch_ = 0;
  int64_t row_ = 0;
  // The epoch whose order is cached: its document order and each document's start in the stream.
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> order_;    // (n_docs,)
  mutable std::vector<int64_t> offsets_;  // (n_docs + 1,)
};

}  // namespace kiln::data

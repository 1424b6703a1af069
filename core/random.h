// Generator: a Philox seed plus an offset that each random op advances, so successive calls draw
// fresh numbers and a saved (seed, offset) replays them exactly (checkpoint recompute, resume).
#pragma once
#include <atomic>
#include <cstdint>

namespace kiln {

struct GeneratorState {
  uint64_t seed = 0;
  uint64_t offset = 0;
};

class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}
  void manual_seed(uint64_t seed) { seed_ = seed; offset_ = 0; }
  uint64_t seed() const { return seed_; }
  // Reserves the offset for one random op.
  uint64_t next_offset() { return offset_.fetch_add(1); }
  GeneratorState state() const { return {seed_, offset_.load()}; }
  void set_state(const GeneratorState& s) { seed_ = s.seed; offset_ = s.offset; }

 private:
  uint64_t seed_;
  std::atomic<uint64_t> offset_{0};
};

Generator& default_generator();
inline void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace kiln

// The on-disk cache of compiled kernels: one file per key under <dir>/compile, where <dir> is
// $KILN_CACHE_DIR or ~/.cache/kiln. A file is named by a hash of its key and holds the key itself
// (a hash collision reads as a miss), is written atomically (temporary file, then rename: readers in
// other processes see a whole file or none), and is touched on every hit, so eviction — oldest
// first, once the folder passes $KILN_CACHE_MAX_MB (default 512) — removes the least recently used.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace kiln::compile {

class DiskCache {
 public:
  DiskCache(std::string dir, uint64_t max_bytes);
  // The cache the environment names (read on each call, so tests can point it elsewhere).
  static DiskCache from_environment();

  std::optional<std::string> get(const std::string& key) const;
  void put(const std::string& key, const std::string& value) const;
  const std::string& dir() const { return dir_; }
  uint64_t size_bytes() const;  // of the cache files

 private:
  std::string path_of(const std::string& key) const;
  void evict() const;
  std::string dir_;
  uint64_t max_bytes_;
};

}  // namespace kiln::compile

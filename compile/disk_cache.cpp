// The kernel disk cache: keyed files, atomic writes, least-recently-used eviction.
#include "compile/disk_cache.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <vector>

#include "compile/codegen.h"
#include "core/error.h"
#include "core/file_io.h"

namespace kiln::compile {
namespace fs = std::filesystem;
namespace {

constexpr const char* kMagic = "kiln-kernel-cache 1\n";
constexpr const char* kSuffix = ".kbin";

}  // namespace

DiskCache::DiskCache(std::string dir, uint64_t max_bytes) : dir_(std::move(dir)), max_bytes_(max_bytes) {}

DiskCache DiskCache::from_environment() {
  std::string root;
  if (const char* d = std::getenv("KILN_CACHE_DIR"); d && *d) {
    root = d;
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    root = std::string(h) + "/.cache/kiln";
  } else {
    root = (fs::temp_directory_path() / "kiln-cache").string();
  }
  uint64_t mb = 512;
  if (const char* m = std::getenv("KILN_CACHE_MAX_MB"); m && *m) mb = std::strtoull(m, nullptr, 10);
  return DiskCache(root + "/compile", mb << 20);
}

std::string DiskCache::path_of(const std::string& key) const {
  return fmt::format("{}/{:016x}{}", dir_, fnv1a(key), kSuffix);
}

std::optional<std::string> DiskCache::get(const std::string& key) const {
  const std::string path = path_of(key);
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  std::string bytes;
  try {
    bytes = read_file(path, "compile");
  } catch (const Error&) {
    return std::nullopt;  // evicted by another process meanwhile
  }
  const std::string head = fmt::format("{}{}\n", kMagic, key.size());
  if (bytes.compare(0, head.size(), head) != 0 || bytes.compare(head.size(), key.size(), key) != 0) return std::nullopt;
  fs::last_write_time(path, fs::file_time_type::clock::now(), ec);  // recently used
  return bytes.substr(head.size() + key.size());
}

void DiskCache::put(const std::string& key, const std::string& value) const {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  KILN_CHECK(!ec, "compile", "cannot create the kernel cache folder '{}': {}", dir_, ec.message());
  write_file_atomic(path_of(key), fmt::format("{}{}\n{}{}", kMagic, key.size(), key, value), "compile");
  evict();
}

uint64_t DiskCache::size_bytes() const {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.is_regular_file(ec) && e.path().extension() == kSuffix) total += e.file_size(ec);
  return total;
}

void DiskCache::evict() const {
  struct Entry {
    fs::path path;
    fs::file_time_type used;
    uint64_t bytes;
  };
  std::vector<Entry> entries;
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    if (!e.is_regular_file(ec) || e.path().extension() != kSuffix) continue;
    entries.push_back({e.path(), e.last_write_time(ec), e.file_size(ec)});
    total += entries.back().bytes;
  }
  if (total <= max_bytes_) return;
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.used < b.used; });
  for (const Entry& e : entries) {
    if (total <= max_bytes_) break;
    if (fs::remove(e.path, ec)) total -= e.bytes;
  }
}

}  // namespace kiln::compile

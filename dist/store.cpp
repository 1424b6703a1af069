// The in-process HashStore and the settings check every store supports.
#include "dist/store.h"

#include <fmt/format.h>

#include "core/error.h"

namespace kiln::dist {

std::string format_duration(std::chrono::milliseconds d) {
  const auto ms = d.count();
  if (ms < 1000) return fmt::format("{} ms", ms);
  if (ms < 120000) return fmt::format("{:g} s", static_cast<double>(ms) / 1000.0);
  return fmt::format("{:g} min", static_cast<double>(ms) / 60000.0);
}

void HashStore::set(const std::string& key, const std::string& value) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    data_[key] = value;
  }
  cv_.notify_all();
}

std::string HashStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  wait({key}, timeout);
  std::lock_guard<std::mutex> lock(mutex_);
  return data_.at(key);
}

int64_t HashStore::add(const std::string& key, int64_t delta) {
  int64_t v = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = data_.find(key);
    if (it != data_.end()) v = std::stoll(it->second);
    v += delta;
    data_[key] = std::to_string(v);
  }
  cv_.notify_all();
  return v;
}

void HashStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mutex_);
  for (const std::string& k : keys) {
    bool ok = cv_.wait_until(lock, deadline, [&] { return data_.count(k) > 0; });
    KILN_CHECK(ok, "store", "timed out after {} waiting for '{}'", format_duration(timeout), k);
  }
}

bool HashStore::contains(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  return data_.count(key) > 0;
}

namespace {
std::string quoted(const std::string& v) {
  constexpr size_t kMax = 200;
  if (v.size() <= kMax) return fmt::format("'{}'", v);
  return fmt::format("'{}...' ({} bytes)", v.substr(0, kMax), v.size());
}
}  // namespace

void check_same(Store& store, int rank, int world_size, const std::string& key, const std::string& value,
                std::chrono::milliseconds timeout) {
  // The n-th check of `key` on this rank uses its own keys, so a setting can be checked again later.
  const int64_t n = store.add(fmt::format("kiln/check/{}/calls/{}", key, rank), 1);
  const std::string prefix = fmt::format("kiln/check/{}/{}/", key, n);
  store.set(prefix + std::to_string(rank), value);
  // Rank 0's value first: a rank that differs from it says so at once, even if it disagrees on the
  // world size itself.
  const std::string first = rank == 0 ? value : store.get(prefix + "0", timeout);
  auto fail = [&](int r, const std::string& v) {
    KILN_FAIL("check_same", "setting '{}' differs across ranks: rank {} has {}, rank 0 has {}", key, r, quoted(v),
              quoted(first));
  };
  if (value != first) fail(rank, value);
  for (int r = 1; r < world_size; ++r) {
    const std::string v = r == rank ? value : store.get(prefix + std::to_string(r), timeout);
    if (v != first) fail(r, v);
  }
}

}  // namespace kiln::dist

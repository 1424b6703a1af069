// Store: the small key-value service ranks rendezvous through (NCCL ids, Gloo addresses, settings
// checks). Store is the interface; HashStore serves threads of one process (the local backend, a
// world of 1); TcpStore (dist/tcp_store.h) serves processes.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace kiln::dist {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  // Blocks until `key` is set; throws kiln::Error "[store] timed out after ... waiting for 'key'".
  virtual std::string get(const std::string& key, std::chrono::milliseconds timeout) = 0;
  // Adds `delta` to the integer under `key` (0 when absent) and returns the new value; atomic.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
  // Blocks until every key is set (same timeout error as get).
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;
  virtual bool contains(const std::string& key) = 0;
};

// Every rank calls it with its value of one setting; when a rank's value differs from rank 0's, every
// rank throws "[check_same] setting 'k' differs across ranks: rank 2 has 'x', rank 0 has 'y'". Calls
// must come in the same order on every rank; a key may be checked again later.
void check_same(Store& store, int rank, int world_size, const std::string& key, const std::string& value,
                std::chrono::milliseconds timeout);

// In-process store (threads).
class HashStore final : public Store {
 public:
  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  bool contains(const std::string& key) override;

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, std::string> data_;
};

// "2.5 s", "10 min": a duration for error messages.
std::string format_duration(std::chrono::milliseconds d);

}  // namespace kiln::dist

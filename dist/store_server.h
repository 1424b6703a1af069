// The TCP store's server (internal): a thread in rank 0's process serving keys, blocking gets and
// waits with timeouts, counters, and what the ranks' connections say about them: when each was last
// heard from, and whether it left cleanly (said bye) or went missing (its connection broke).
#pragma once
#include <chrono>
#include <memory>

namespace kiln::dist {

enum class RankState : uint8_t { unknown = 0, connected = 1, left = 2, lost = 3 };
const char* rank_state_name(RankState s);

class StoreServer {
 public:
  // Listens on `port` (0: any free port) on every interface, for a job of `world_size` ranks. The
  // destructor waits up to `linger` for every client to disconnect before it stops serving.
  StoreServer(int port, int world_size, std::chrono::milliseconds linger);
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;
  int port() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace kiln::dist

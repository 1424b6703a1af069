// TcpStore: the Store of a multi-process job over plain TCP. Rank 0 runs the server (a thread in its
// process) at MASTER_ADDR:MASTER_PORT; every rank connects as a client. Beyond keys it tracks the
// ranks themselves (last heard from, left cleanly or went missing) and one job-wide abort message,
// which the process groups' monitors use to name the rank that stalled or vanished.
#pragma once
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "dist/socket.h"
#include "dist/store.h"
#include "dist/store_server.h"

namespace kiln::dist {

struct RankStatus {
  RankState state = RankState::unknown;
  int64_t ms_since_seen = -1;  // -1: never heard from
  bool has_value = false;      // the value of the status() prefix + rank, if set
  std::string value;
};

struct StoreStatus {
  std::string abort_message;  // the first abort posted, or ""
  std::vector<RankStatus> ranks;
};

class TcpStore final : public Store {
 public:
  // serve: run the server here, listening on `port` on every interface (rank 0); port 0 picks a
  // free one (port() tells which). Connecting retries until `timeout`.
  TcpStore(const std::string& host, int port, int rank, int world_size, bool serve,
           std::chrono::milliseconds timeout = kDefaultStoreTimeout);
  ~TcpStore() override;

  static constexpr std::chrono::milliseconds kDefaultStoreTimeout = std::chrono::minutes(10);

  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  bool contains(const std::string& key) override;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int port() const { return port_; }
  const std::string& host() const { return host_; }  // MASTER_ADDR as given (rank 0 connects to itself locally)
  std::chrono::milliseconds timeout() const { return timeout_; }

  // A second connection to the same server (for a thread that must not queue behind blocking gets).
  std::shared_ptr<TcpStore> connect_again() const;
  // Sets key = value, marks this rank alive, and returns the abort message and the ranks that left
  // (said bye) or were lost (connection broke).
  std::pair<std::string, std::vector<std::pair<int, RankState>>> heartbeat(const std::string& key,
                                                                           const std::string& value);
  // Every rank's state, and the values of prefix + rank.
  StoreStatus status(const std::string& prefix);
  // Posts `message` as the job's abort message unless one is there; returns the one kept.
  std::string post_abort(const std::string& message);

 private:
  TcpStore(std::string host, std::string connect_host, int port, int rank, int world_size,
           std::shared_ptr<StoreServer> server, std::chrono::milliseconds timeout);
  void connect();
  // Sends a request and returns the reply's fields after the status (throws on an error reply; a
  // timeout reply throws `timeout_message`).
  std::string request(const std::string& payload, std::chrono::milliseconds server_wait = {},
                      const std::string& timeout_message = "");

  std::string host_;
  std::string connect_host_;
  int port_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<StoreServer> server_;  // declared before sock_: the connection closes first
  std::mutex mutex_;
  net::Socket sock_;
};

}  // namespace kiln::dist

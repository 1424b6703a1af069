// Monitor: the watch a multi-process group keeps over its peers through the TcpStore. A thread sends
// heartbeats carrying this rank's progress (collectives started/finished); when a collective fails
// or times out, diagnose() asks the store who is missing (a rank that went missing, left, never
// joined the collective, or went silent) and posts one job-wide abort message naming it.
#pragma once
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "dist/process_group.h"
#include "dist/tcp_store.h"

namespace kiln::dist {

class Monitor {
 public:
  // `on_failure` runs on the monitor's thread when the store reports a failure (an abort message, or
  // a rank that left or went missing) while a collective is in flight here.
  Monitor(const TcpStore& store, std::string group, int rank, int size, std::chrono::milliseconds timeout,
          std::function<void(const std::string&)> on_failure);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  void started(const Call& call);
  void finished(const Call& call);

  // Fails fast at call time: a known failure (the job's abort message, a rank that left or went
  // missing, a lost store) as the error for `call`, else "".
  std::string known_failure(const Call& call);
  // After `call` failed with the transport's `error` (timed_out: it ran past the timeout): names the
  // missing rank(s), posts the abort message and returns it (or the one another rank posted first).
  std::string diagnose(const Call& call, const std::string& error, bool timed_out);

  std::chrono::milliseconds interval() const { return interval_; }

 private:
  void loop();
  // What the store says about the other ranks in `call`; `inconclusive` counts ranks not heard from
  // since this rank started it (their progress may be stale).
  std::string causes(const Call& call, const StoreStatus& st, int* inconclusive) const;
  std::string progress_prefix() const { return "kiln/progress/" + group_ + "/"; }

  std::shared_ptr<TcpStore> store_;  // its own connection
  std::string group_;
  int rank_, size_;
  std::chrono::milliseconds timeout_, interval_;
  std::function<void(const std::string&)> on_failure_;
  std::atomic<uint64_t> started_{0}, finished_{0};  // collectives started / finished on this rank
  std::atomic<int> current_kind_{0};
  static constexpr size_t kStartTimes = 4096;
  std::array<std::atomic<int64_t>, kStartTimes> started_at_ms_{};  // steady clock ms, by seq % kStartTimes
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool dirty_ = false;  // progress changed: heartbeat now
  std::map<int, RankState> gone_;  // ranks that left or went missing, as last heard
  std::string abort_message_;
  bool store_lost_ = false;
  std::string store_error_;
  std::thread thread_;
};

}  // namespace kiln::dist

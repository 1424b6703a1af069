// The monitor's heartbeat thread and its diagnosis of failed collectives (see monitor.h).
#include "dist/monitor.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"

namespace kiln::dist {
namespace {

// "started finished" (counts of collectives) as a rank's progress value.
int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::pair<uint64_t, uint64_t> parse_progress(const std::string& v) {
  std::istringstream in(v);
  uint64_t s = 0, f = 0;
  in >> s >> f;
  return {s, f};
}

}  // namespace

Monitor::Monitor(const TcpStore& store, std::string group, int rank, int size, std::chrono::milliseconds timeout,
                 std::function<void(const std::string&)> on_failure)
    : store_(store.connect_again()), group_(std::move(group)), rank_(rank), size_(size), timeout_(timeout),
      interval_(std::clamp<std::chrono::milliseconds>(timeout / 10, std::chrono::milliseconds(50),
                                                       std::chrono::milliseconds(1000))),
      on_failure_(std::move(on_failure)) {
  thread_ = std::thread([this] { loop(); });
}

Monitor::~Monitor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Monitor::started(const Call& call) {
  current_kind_ = static_cast<int>(call.kind);
  started_at_ms_[call.seq % kStartTimes] = now_ms();
  started_ = call.seq + 1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dirty_ = true;
  }
  cv_.notify_all();  // the others learn at once that this rank joined
}

void Monitor::finished(const Call& call) { finished_ = call.seq + 1; }

void Monitor::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    lock.unlock();
    std::string failure;
    try {
      auto [abort, gone] = store_->heartbeat(progress_prefix() + std::to_string(rank_),
                                             fmt::format("{} {}", started_.load(), finished_.load()));
      lock.lock();
      abort_message_ = abort;
      for (auto [r, st] : gone) gone_[r] = st;
      lock.unlock();
      const bool in_flight = started_.load() > finished_.load();
      bool lost = std::any_of(gone.begin(), gone.end(), [](auto& g) { return g.second == RankState::lost; });
      if (in_flight && (!abort.empty() || lost)) {
        Call c;
        c.kind = static_cast<Collective>(current_kind_.load());
        c.seq = started_.load() - 1;
        failure = diagnose(c, "a peer failed", /*timed_out=*/false);
      }
    } catch (const std::exception& e) {
      lock.lock();
      if (!store_lost_) {
        store_lost_ = true;
        store_error_ = e.what();
      }
      lock.unlock();
      if (started_.load() > finished_.load()) {
        failure = fmt::format("[{}] collective #{} failed: rank 0 went missing (the store in its process is gone: {})",
                              collective_name(static_cast<Collective>(current_kind_.load())), started_.load() - 1,
                              e.what());
      }
    }
    if (!failure.empty() && on_failure_) on_failure_(failure);
    lock.lock();
    cv_.wait_for(lock, interval_, [&] { return stop_ || dirty_; });
    dirty_ = false;
  }
}

std::string Monitor::known_failure(const Call& call) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!abort_message_.empty()) return fmt::format("[{}] the job was aborted: {}", call.name(), abort_message_);
  if (store_lost_) return fmt::format("[{}] rank 0 went missing (the store in its process is gone: {})", call.name(), store_error_);
  for (auto [r, st] : gone_) {
    if (st == RankState::lost)
      return fmt::format("[{}] rank {} went missing (its process exited or its connection broke) before collective #{}",
                         call.name(), r, call.seq);
    return fmt::format("[{}] rank {} left the group (destroyed it or exited) before collective #{}", call.name(), r,
                       call.seq);
  }
  return "";
}

std::string Monitor::causes(const Call& call, const StoreStatus& st, int* inconclusive) const {
  std::vector<std::string> out;
  *inconclusive = 0;
  const auto stale_ms = std::max<int64_t>(5 * interval_.count(), 2000);
  // Ranks heard from after this rank started the collective report current progress.
  const int64_t since_start = call.seq < started_.load() ? now_ms() - started_at_ms_[call.seq % kStartTimes].load() : 0;
  for (int r = 0; r < static_cast<int>(st.ranks.size()); ++r) {
    if (r == rank_) continue;
    const RankStatus& rs = st.ranks[static_cast<size_t>(r)];
    const uint64_t started = rs.has_value ? parse_progress(rs.value).first : 0;
    const bool fresh = rs.ms_since_seen >= 0 && rs.ms_since_seen < since_start;
    if (rs.state == RankState::lost) {
      out.push_back(fmt::format("rank {} went missing (its process exited or its connection broke)", r));
    } else if (rs.state == RankState::left && started <= call.seq) {
      out.push_back(fmt::format("rank {} left the group without joining it", r));
    } else if (rs.state == RankState::unknown) {
      out.push_back(fmt::format("rank {} never connected", r));
    } else if (started > call.seq) {
      continue;  // joined
    } else if (fresh) {
      out.push_back(started == 0 ? fmt::format("rank {} has not joined it (it has called no collective yet)", r)
                                 : fmt::format("rank {} has not joined it (its last collective is #{})", r, started - 1));
    } else if (rs.ms_since_seen > stale_ms) {
      out.push_back(fmt::format("rank {} has not been heard from for {}", r,
                                format_duration(std::chrono::milliseconds(rs.ms_since_seen))));
    } else {
      ++*inconclusive;
    }
  }
  std::string joined;
  for (const std::string& s : out) joined += (joined.empty() ? "" : "; ") + s;
  return joined;
}

std::string Monitor::diagnose(const Call& call, const std::string& error, bool timed_out) {
  StoreStatus st;
  std::string why;
  try {
    // Give the store a moment: a rank going missing closes its connection as the transport fails,
    // and ranks not heard from since this collective started send their progress within an interval.
    const auto until = std::chrono::steady_clock::now() + std::max(3 * interval_, std::chrono::milliseconds(500));
    for (;;) {
      st = store_->status(progress_prefix());
      int inconclusive = 0;
      why = causes(call, st, &inconclusive);
      const bool settled = !st.abort_message.empty() || (inconclusive == 0 && (timed_out || !why.empty()));
      if (settled || std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(std::min(interval_ / 2, std::chrono::milliseconds(50)));
    }
  } catch (const std::exception& e) {
    return fmt::format("[{}] collective #{} failed: rank 0 went missing (the store in its process is gone: {}); {}",
                       call.name(), call.seq, e.what(), error);
  }
  if (!st.abort_message.empty())
    return fmt::format("[{}] collective #{} failed on rank {}: {}", call.name(), call.seq, rank_, st.abort_message);
  std::string message;
  if (timed_out) {
    message = fmt::format("[{}] timed out after {} in collective #{} on rank {}: {}", call.name(),
                          format_duration(timeout_), call.seq, rank_,
                          why.empty() ? "every rank joined it; the transport stalled (" + error + ")" : why);
  } else {
    message = fmt::format("[{}] collective #{} failed on rank {}: {} ({})", call.name(), call.seq, rank_,
                          why.empty() ? "no rank is known to be missing" : why, error);
  }
  try {
    std::string kept = store_->post_abort(message);
    if (kept != message)
      return fmt::format("[{}] collective #{} failed on rank {}: {}", call.name(), call.seq, rank_, kept);
  } catch (const std::exception&) {
    // The store went away between the two requests: our own message still names the cause.
  }
  return message;
}

}  // namespace kiln::dist

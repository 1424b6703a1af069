// The local backend: a LocalWorld holds one slot per collective; each rank's call fills its part, and
// the last rank to arrive runs the collective for everyone (CPU: copies and reduce loops in its call;
// CUDA: queued on the collective stream). Earlier ranks get a Work that waits for it, with a timeout
// that names the ranks that never came; a rank that failed or left aborts the world at once.
#include "dist/local.h"

#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "core/cuda/runtime.h"
#include "dist/call_check.h"
#include "dist/local_cuda.h"
#include "dist/reduce_cpu.h"
#include "dist/store.h"

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;

struct Slot {
  uint64_t seq = 0;
  Collective kind = Collective::barrier;
  std::vector<Call> calls;     // by rank
  std::vector<bool> present;   // by rank
  int arrived = 0;
  int first = -1;              // the first rank that arrived (its record is the reference)
  bool finished = false;       // ran (CPU) or was queued (CUDA), or failed
  std::string error;
  bool cuda = false;
  Device device;
  std::vector<std::unique_ptr<cuda::Event>> ready;  // by rank (CUDA)
  std::unique_ptr<cuda::Event> done;                // (CUDA)
};

void execute_cpu(const Slot& s) {
  const auto n = s.calls.size();
  switch (s.kind) {
    case Collective::barrier: return;
    case Collective::all_gather: {
      const size_t bytes = s.calls[0].input.nbytes();
      if (bytes == 0) return;
      for (size_t r = 0; r < n; ++r) {
        auto* out = static_cast<char*>(s.calls[r].output.raw_data());
        for (size_t src = 0; src < n; ++src) std::memmove(out + src * bytes, s.calls[src].input.raw_data(), bytes);
      }
      return;
    }
    case Collective::broadcast: {
      const Call& root = s.calls[static_cast<size_t>(s.calls[0].root)];
      const size_t bytes = root.input.nbytes();
      if (bytes == 0) return;
      for (size_t r = 0; r < n; ++r) {
        if (s.calls[r].output.raw_data() != root.input.raw_data())
          std::memcpy(s.calls[r].output.raw_data(), root.input.raw_data(), bytes);
      }
      return;
    }
    case Collective::reduce_scatter: {
      const int64_t count = s.calls[0].output.numel();
      if (count == 0) return;
      const size_t chunk = s.calls[0].output.nbytes();
      for (size_t r = 0; r < n; ++r) {
        std::vector<const void*> srcs;
        for (size_t src = 0; src < n; ++src) srcs.push_back(static_cast<const char*>(s.calls[src].input.raw_data()) + r * chunk);
        reduce_cpu(s.calls[0].input.dtype(), ReduceOp::sum, srcs, {s.calls[r].output.raw_data()}, count);
      }
      return;
    }
    case Collective::all_reduce: {
      const int64_t count = s.calls[0].input.numel();
      if (count == 0) return;
      std::vector<const void*> srcs;
      std::vector<void*> dsts;
      for (const Call& c : s.calls) {
        srcs.push_back(c.input.raw_data());
        dsts.push_back(c.output.raw_data());
      }
      reduce_cpu(s.calls[0].input.dtype(), s.calls[0].op, srcs, dsts, count);
      return;
    }
  }
}

class LocalWorld : public std::enable_shared_from_this<LocalWorld> {
 public:
  LocalWorld(int size, std::chrono::milliseconds timeout)
      : size_(size), timeout_(timeout), arrived_(static_cast<size_t>(size), 0),
        departed_(static_cast<size_t>(size), false), store_(std::make_shared<HashStore>()) {}

  int size() const { return size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  std::shared_ptr<Store> store() const { return store_; }

  Work submit(int rank, Call call);
  void wait(const std::shared_ptr<Slot>& slot, Clock::time_point deadline);
  bool is_completed(const std::shared_ptr<Slot>& slot, Clock::time_point deadline);

  void abort(const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    abort_locked(message);
  }

  // Rank `rank` will call nothing more: collectives waiting for it fail now.
  void depart(int rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    departed_[static_cast<size_t>(rank)] = true;
    for (const auto& [seq, slot] : slots_) {
      if (!slot->present[static_cast<size_t>(rank)]) {
        abort_locked(fmt::format("[{}] rank {} left the group (its thread finished or its group was destroyed) "
                                 "without joining collective #{}", collective_name(slot->kind), rank, seq));
        return;
      }
    }
  }

 private:
  void abort_locked(const std::string& message) {
    if (abort_message_.empty()) abort_message_ = message;
    cv_.notify_all();
  }
  [[noreturn]] void throw_aborted(const char* op) const {
    KILN_FAIL(op, "the process group was aborted: {}", abort_message_);
  }
  std::string diagnose_timeout(const Slot& slot) const;

  const int size_;
  const std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<uint64_t, std::shared_ptr<Slot>> slots_;  // collectives some rank has called and not yet run
  std::vector<uint64_t> arrived_;                     // by rank: collectives called so far
  std::vector<bool> departed_;
  std::string abort_message_;
  std::shared_ptr<HashStore> store_;
};

class LocalWork final : public Work::Impl {
 public:
  LocalWork(std::shared_ptr<LocalWorld> world, std::shared_ptr<Slot> slot, Clock::time_point deadline)
      : world_(std::move(world)), slot_(std::move(slot)), deadline_(deadline) {}
  void wait() override { world_->wait(slot_, deadline_); }
  bool is_completed() override { return world_->is_completed(slot_, deadline_); }

 private:
  std::shared_ptr<LocalWorld> world_;
  std::shared_ptr<Slot> slot_;
  Clock::time_point deadline_;
};

Work LocalWorld::submit(int rank, Call call) {
  const auto deadline = Clock::now() + timeout_;
  const size_t r = static_cast<size_t>(rank);
  const uint64_t seq = call.seq;
  std::unique_lock<std::mutex> lock(mutex_);
  if (!abort_message_.empty()) throw_aborted(call.name());
  for (int other = 0; other < size_; ++other) {
    if (departed_[static_cast<size_t>(other)] && arrived_[static_cast<size_t>(other)] <= seq) {
      abort_locked(fmt::format("[{}] rank {} left the group (its thread finished or its group was destroyed) without "
                               "joining collective #{}", call.name(), other, seq));
      throw Error(abort_message_);
    }
  }
  std::shared_ptr<Slot>& entry = slots_[seq];
  if (!entry) {
    entry = std::make_shared<Slot>();
    entry->seq = seq;
    entry->kind = call.kind;
    entry->calls.resize(static_cast<size_t>(size_));
    entry->present.assign(static_cast<size_t>(size_), false);
    entry->ready.resize(static_cast<size_t>(size_));
    if (call.input.defined()) {
      entry->device = call.input.device();
      entry->cuda = entry->device.is_cuda();
    }
  }
  std::shared_ptr<Slot> slot = entry;
  if (slot->first >= 0) {
    const Call& ref = slot->calls[static_cast<size_t>(slot->first)];
    std::string diff = compare_records(make_record(call), rank, make_record(ref), slot->first);
    if (diff.empty() && call.input.defined() && call.input.device() != slot->device) {
      diff = fmt::format("[{}] rank {} gave a tensor on {}, rank {} on {}; the local backend shares one device",
                         call.name(), rank, call.input.device().str(), slot->first, slot->device.str());
    }
    if (!diff.empty()) {
      abort_locked(diff);
      throw Error(diff);
    }
  } else {
    slot->first = rank;
  }
  if (slot->cuda) {
    slot->ready[r] = std::make_unique<cuda::Event>();
    slot->ready[r]->record(cuda::current_stream(slot->device.index));  // this rank's inputs are ready
  }
  slot->calls[r] = std::move(call);
  slot->present[r] = true;
  arrived_[r] = seq + 1;
  auto work = Work(std::make_shared<LocalWork>(shared_from_this(), slot, deadline));
  if (++slot->arrived < size_) return work;

  // The last rank runs the collective for all, outside the lock.
  slots_.erase(seq);
  lock.unlock();
  std::string error;
  try {
    if (slot->cuda) {
      slot->done = std::make_unique<cuda::Event>();
      local_cuda_enqueue(slot->calls, slot->ready, *slot->done);
    } else {
      execute_cpu(*slot);
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  lock.lock();
  slot->finished = true;
  slot->error = error;
  if (!error.empty()) abort_locked(error);
  cv_.notify_all();
  if (!error.empty()) throw Error(error);
  return work;
}

std::string LocalWorld::diagnose_timeout(const Slot& slot) const {
  std::vector<std::string> missing;
  for (int r = 0; r < size_; ++r) {
    const uint64_t n = arrived_[static_cast<size_t>(r)];
    if (n > slot.seq) continue;
    if (departed_[static_cast<size_t>(r)]) {
      missing.push_back(fmt::format("rank {} left the group without joining it", r));
    } else if (n == 0) {
      missing.push_back(fmt::format("rank {} has not joined it (it has called no collective yet)", r));
    } else {
      missing.push_back(fmt::format("rank {} has not joined it (its last collective is #{})", r, n - 1));
    }
  }
  if (missing.empty()) missing.push_back("every rank joined; it was still running");
  return fmt::format("[{}] timed out after {} in collective #{}: {}", collective_name(slot.kind),
                     format_duration(timeout_), slot.seq, fmt::join(missing, "; "));
}

void LocalWorld::wait(const std::shared_ptr<Slot>& slot, Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait_until(lock, deadline, [&] { return slot->finished || !abort_message_.empty(); });
  if (slot->finished) {
    if (!slot->error.empty()) throw Error(slot->error);
    if (slot->cuda) slot->done->wait(cuda::current_stream(slot->device.index));
    return;
  }
  if (!abort_message_.empty()) throw_aborted(collective_name(slot->kind));
  abort_locked(diagnose_timeout(*slot));
  throw Error(abort_message_);
}

bool LocalWorld::is_completed(const std::shared_ptr<Slot>& slot, Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (slot->finished) {
    if (!slot->error.empty()) throw Error(slot->error);
    return !slot->cuda || slot->done->query();
  }
  if (!abort_message_.empty()) throw_aborted(collective_name(slot->kind));
  if (Clock::now() < deadline) return false;
  abort_locked(diagnose_timeout(*slot));
  throw Error(abort_message_);
}

class LocalProcessGroup final : public ProcessGroup {
 public:
  LocalProcessGroup(std::shared_ptr<LocalWorld> world, int rank)
      : ProcessGroup(rank, world->size(), world->timeout()), world_(std::move(world)) {}
  ~LocalProcessGroup() override { world_->depart(rank()); }

  std::string backend() const override { return "local"; }
  std::shared_ptr<Store> store() const override { return world_->store(); }
  void abort(const std::string& message) override { world_->abort(message); }

 protected:
  Work run(Call call) override { return world_->submit(rank(), std::move(call)); }
  bool supports(const Device& d) const override { return d.is_cpu() || cuda::is_available(); }

 private:
  std::shared_ptr<LocalWorld> world_;
};

}  // namespace

std::vector<std::shared_ptr<ProcessGroup>> make_local_groups(int world_size, std::chrono::milliseconds timeout) {
  KILN_CHECK(world_size >= 1, "dist local", "expected a world size >= 1, found {}", world_size);
  auto world = std::make_shared<LocalWorld>(world_size, timeout);
  std::vector<std::shared_ptr<ProcessGroup>> groups;
  for (int r = 0; r < world_size; ++r) groups.push_back(std::make_shared<LocalProcessGroup>(world, r));
  return groups;
}

void run_local(int world_size, const std::function<void(ProcessGroup&)>& fn, std::chrono::milliseconds timeout) {
  auto groups = make_local_groups(world_size, timeout);
  std::mutex mutex;
  int failed_rank = -1;
  std::string failure;
  auto body = [&](int r) {
    std::shared_ptr<ProcessGroup>& group = groups[static_cast<size_t>(r)];
    std::string error;
    try {
      fn(*group);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "an exception that is not a std::exception";
    }
    if (!error.empty()) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (failed_rank < 0) {
          failed_rank = r;
          failure = error;
        }
      }
      group->abort(fmt::format("rank {} failed: {}", r, error));
    }
    group.reset();  // this rank calls nothing more
  };
  std::vector<std::thread> threads;
  for (int r = 1; r < world_size; ++r) threads.emplace_back(body, r);
  body(0);  // rank 0 on the caller's thread (its thread-local state, e.g. the current CUDA stream)
  for (std::thread& t : threads) t.join();
  KILN_CHECK(failed_rank < 0, "run_local", "rank {} failed: {}", failed_rank, failure);
}

}  // namespace kiln::dist

// The Gloo process group: rendezvous (gloo's full mesh over its TCP transport, addresses exchanged
// through kiln's store), a worker thread running collectives in call order, and the algorithms on
// raw bytes: allgather, broadcast, barrier; reduce_scatter and all_reduce as an alltoall followed by
// kiln's own rank-order reduction (so results equal the local backend's bit for bit).
#include <gloo/allgather.h>
#include <gloo/alltoall.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <signal.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "core/ops.h"
#include "dist/call_check.h"
#include "dist/gloo_group.h"
#include "dist/monitor.h"
#include "dist/reduce_cpu.h"

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;

// Gloo's TCP transport writes with writev, which raises SIGPIPE once a peer has gone: a rank whose peer
// vanished must get the error (and name that rank), not die of the signal. SIGPIPE's default action
// (terminate) becomes ignore; a handler the program installed itself is left alone.
void ignore_sigpipe() {
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
}

// gloo's rendezvous store over kiln's, under a prefix.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(dist::Store& store, std::string prefix, std::chrono::milliseconds timeout)
      : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(prefix_ + key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    std::string v = store_.get(prefix_ + key, timeout_);
    return {v.begin(), v.end()};
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    std::vector<std::string> full;
    for (const std::string& k : keys) full.push_back(prefix_ + k);
    store_.wait(full, timeout);
  }

 private:
  dist::Store& store_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
};

// A call whose record differs across ranks: every rank sees the same records and the same error.
struct Mismatch : Error {
  using Error::Error;
};

struct Job {
  Call call;
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  std::string error;
  void finish(std::string e) {
    std::lock_guard<std::mutex> lock(mutex);
    done = true;
    error = std::move(e);
    cv.notify_all();
  }
};

class GlooWork final : public Work::Impl {
 public:
  explicit GlooWork(std::shared_ptr<Job> job) : job_(std::move(job)) {}
  void wait() override {
    std::unique_lock<std::mutex> lock(job_->mutex);
    job_->cv.wait(lock, [&] { return job_->done; });  // the worker's every gloo call has a timeout
    if (!job_->error.empty()) throw Error(job_->error);
  }
  bool is_completed() override {
    std::lock_guard<std::mutex> lock(job_->mutex);
    if (job_->done && !job_->error.empty()) throw Error(job_->error);
    return job_->done;
  }

 private:
  std::shared_ptr<Job> job_;
};

class GlooGroup final : public ProcessGroup {
 public:
  GlooGroup(std::shared_ptr<TcpStore> store, std::chrono::milliseconds timeout, const std::string& name)
      : ProcessGroup(store->rank(), store->world_size(), timeout), store_(std::move(store)) {
    // The n-th gloo group of this name on this rank: keys of earlier ones do not collide.
    const int64_t generation = store_->add(fmt::format("kiln/gloo/{}/generation/{}", name, rank()), 1);
    const std::string prefix = fmt::format("kiln/gloo/{}/{}/", name, generation);
    gloo::transport::tcp::attr attr;
    attr.hostname = net::local_address_towards(store_->host());
    if (const char* iface = std::getenv("GLOO_SOCKET_IFNAME"); iface != nullptr && *iface != '\0') {
      attr.hostname.clear();
      attr.iface = iface;
    }
    StoreAdapter adapter(*store_, prefix, timeout);
    ignore_sigpipe();
    try {
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank(), size());
      context->setTimeout(timeout);
      context->connectFullMesh(adapter, device);
      context_ = context;
    } catch (const std::exception& e) {
      KILN_FAIL("dist gloo", "rank {} could not connect to its {} peers: {}", rank(), size() - 1, e.what());
    }
    monitor_ = std::make_unique<Monitor>(*store_, "gloo/" + name + "/" + std::to_string(generation), rank(), size(),
                                         timeout, [this](const std::string& m) { abort(m); });
    worker_ = std::thread([this] { work_loop(); });
  }

  ~GlooGroup() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
    monitor_.reset();
    context_.reset();
  }

  std::string backend() const override { return "gloo"; }
  std::shared_ptr<Store> store() const override { return store_; }
  void abort(const std::string& message) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (abort_message_.empty()) abort_message_ = message;
  }

 protected:
  bool supports(const Device& d) const override { return d.is_cpu(); }

  Work run(Call call) override {
    std::string known = monitor_->known_failure(call);
    auto job = std::make_shared<Job>();
    job->call = std::move(call);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!abort_message_.empty()) KILN_FAIL(job->call.name(), "the process group was aborted: {}", abort_message_);
      if (!known.empty()) {
        abort_message_ = known;
        throw Error(known);
      }
      queue_.push_back(job);
    }
    cv_.notify_all();
    return Work(std::make_shared<GlooWork>(job));
  }

 private:
  uint32_t next_tag() { return tag_++; }
  void work_loop();
  void execute(const Call& call);
  void all_gather_bytes(void* out, const void* in, size_t bytes);
  void all_to_all_bytes(void* out, const void* in, size_t bytes);

  std::shared_ptr<TcpStore> store_;
  std::shared_ptr<gloo::Context> context_;
  std::unique_ptr<Monitor> monitor_;
  std::thread worker_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;
  std::string abort_message_;
  uint32_t tag_ = 0;
};

void GlooGroup::work_loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    std::string aborted;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
      if (stop_) aborted = fmt::format("[{}] the process group was destroyed first", job->call.name());
      else if (!abort_message_.empty()) aborted = fmt::format("[{}] the process group was aborted: {}", job->call.name(), abort_message_);
    }
    if (!aborted.empty()) {
      job->finish(aborted);
      continue;
    }
    const Call& call = job->call;
    monitor_->started(call);
    const auto start = Clock::now();
    std::string error;
    try {
      execute(call);
    } catch (const Mismatch& e) {
      error = e.what();
    } catch (const std::exception& e) {
      const bool timed_out = Clock::now() - start >= timeout() * 9 / 10 || std::strstr(e.what(), "Timed out") != nullptr;
      error = monitor_->diagnose(call, e.what(), timed_out);
    }
    monitor_->finished(call);
    if (!error.empty()) abort(error);
    job->finish(error);
  }
}

void GlooGroup::all_gather_bytes(void* out, const void* in, size_t bytes) {
  gloo::AllgatherOptions o(context_);
  o.setInput(static_cast<uint8_t*>(const_cast<void*>(in)), bytes);
  o.setOutput(static_cast<uint8_t*>(out), bytes * static_cast<size_t>(size()));
  o.setTag(next_tag());
  o.setTimeout(timeout());
  gloo::allgather(o);
}

void GlooGroup::all_to_all_bytes(void* out, const void* in, size_t bytes) {
  gloo::AlltoallOptions o(context_);
  o.setInput(static_cast<uint8_t*>(const_cast<void*>(in)), bytes);
  o.setOutput(static_cast<uint8_t*>(out), bytes);
  o.setTag(next_tag());
  o.setTimeout(timeout());
  gloo::alltoall(o);
}

void GlooGroup::execute(const Call& call) {
  const auto n = static_cast<size_t>(size());
  // Every rank's record of this call, before any data moves.
  CallRecord mine = make_record(call);
  std::vector<CallRecord> all(n);
  all_gather_bytes(all.data(), &mine, sizeof(CallRecord));
  std::string diff = compare_records(all);
  if (!diff.empty()) throw Mismatch(diff);
  if (call.kind == Collective::barrier) {
    gloo::BarrierOptions o(context_);
    o.setTag(next_tag());
    o.setTimeout(timeout());
    gloo::barrier(o);
    return;
  }
  const size_t bytes = call.input.nbytes();
  if (bytes == 0) return;  // every rank agreed on 0 bytes
  switch (call.kind) {
    case Collective::all_gather: all_gather_bytes(call.output.raw_data(), call.input.raw_data(), bytes); return;
    case Collective::broadcast: {
      gloo::BroadcastOptions o(context_);
      o.setOutput(static_cast<uint8_t*>(call.output.raw_data()), bytes);  // in place on every rank
      o.setRoot(call.root);
      o.setTag(next_tag());
      o.setTimeout(timeout());
      gloo::broadcast(o);
      return;
    }
    case Collective::reduce_scatter: {
      // received chunk s = rank s's rows for this rank; summed in rank order.
      std::vector<char> received(bytes);
      all_to_all_bytes(received.data(), call.input.raw_data(), bytes);
      const size_t chunk = bytes / n;
      std::vector<const void*> srcs;
      for (size_t s = 0; s < n; ++s) srcs.push_back(received.data() + s * chunk);
      reduce_cpu(call.input.dtype(), ReduceOp::sum, srcs, {call.output.raw_data()}, call.output.numel());
      return;
    }
    case Collective::all_reduce: {
      // Padded to n equal chunks: alltoall, reduce this rank's chunk, allgather the reduced chunks.
      const size_t item = itemsize(call.input.dtype());
      const size_t count = static_cast<size_t>(call.input.numel());
      const size_t chunk_items = (count + n - 1) / n;
      const size_t chunk = chunk_items * item;
      std::vector<char> padded(chunk * n, 0), received(chunk * n), reduced(chunk);
      std::memcpy(padded.data(), call.input.raw_data(), bytes);
      all_to_all_bytes(received.data(), padded.data(), chunk * n);
      std::vector<const void*> srcs;
      for (size_t s = 0; s < n; ++s) srcs.push_back(received.data() + s * chunk);
      reduce_cpu(call.input.dtype(), call.op, srcs, {reduced.data()}, static_cast<int64_t>(chunk_items));
      all_gather_bytes(padded.data(), reduced.data(), chunk);
      std::memcpy(call.output.raw_data(), padded.data(), bytes);
      return;
    }
    case Collective::barrier: return;
  }
}

}  // namespace

std::shared_ptr<ProcessGroup> make_gloo_group(std::shared_ptr<TcpStore> store, std::chrono::milliseconds timeout,
                                              const std::string& name) {
  KILN_CHECK(store != nullptr, "dist gloo", "expected a store");
  return std::make_shared<GlooGroup>(std::move(store), timeout, name);
}

}  // namespace kiln::dist

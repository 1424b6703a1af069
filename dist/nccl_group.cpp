// The NCCL process group: a non-blocking communicator (so nothing in NCCL can hang the host), the
// group's stream, per-call records checked by the watchdog as soon as they arrive, bf16 sums carried
// in f32, NaN-propagating max, and the watchdog that aborts the communicator on any failure.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <deque>
#include <mutex>
#include <thread>

#include "core/cuda/check.h"
#include "core/cuda/runtime.h"
#include "core/ops.h"
#include "dist/call_check.h"
#include "dist/monitor.h"
#include "dist/nccl_group.h"

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kRecordSlots = 1024;  // calls whose records may be in flight at once

ncclDataType_t nccl_dtype(DType d) {
  switch (d) {
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f64: return ncclFloat64;
    case DType::i64: return ncclInt64;
    default: return ncclUint8;
  }
}

struct NcclWork;

// The group's first error, shared with its Work handles (which may outlive the group).
struct GroupError {
  std::mutex mutex;
  std::string message;
  std::string get() {
    std::lock_guard<std::mutex> lock(mutex);
    return message;
  }
  void set(const std::string& m) {
    std::lock_guard<std::mutex> lock(mutex);
    if (message.empty()) message = m;
  }
};

class NcclGroup final : public ProcessGroup {
 public:
  NcclGroup(std::shared_ptr<TcpStore> store, int device, std::chrono::milliseconds timeout, const std::string& name,
            bool check_calls);
  ~NcclGroup() override;

  std::string backend() const override { return "nccl"; }
  std::shared_ptr<Store> store() const override { return store_; }
  void abort(const std::string& message) override { fail(message); }

  std::string error() { return error_->get(); }  // "" while healthy
  void check_ok() override {
    const std::string e = error();
    if (!e.empty()) throw Error(e);
  }

 protected:
  bool supports(const Device& d) const override { return d.is_cuda(); }
  Work run(Call call) override;

 private:
  void fail(const std::string& message);
  void check(ncclResult_t r, const char* op);
  void enqueue(const Call& call);
  void watchdog();
  // Record slot i: [24 bytes: this rank's record][24 * size: every rank's].
  size_t slot_bytes() const { return sizeof(CallRecord) * static_cast<size_t>(size() + 1); }

  std::shared_ptr<TcpStore> store_;
  int device_;
  bool check_calls_;
  ncclComm_t comm_ = nullptr;
  cuda::Stream stream_;
  std::unique_ptr<Monitor> monitor_;
  char* host_records_ = nullptr;  // pinned, kRecordSlots slots
  Tensor device_records_;         // (kRecordSlots * slot_bytes) u8 on the device
  std::mutex comm_mutex_;         // NCCL calls vs. abort
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<NcclWork>> pending_;
  std::shared_ptr<GroupError> error_ = std::make_shared<GroupError>();
  bool aborted_ = false;
  bool stop_ = false;
  std::thread watchdog_;
};

struct NcclWork final : Work::Impl {
  std::shared_ptr<GroupError> error;
  int device = 0;
  Call call;
  Clock::time_point deadline;
  cuda::Event records_ready;  // this call's records copied back to the host
  cuda::Event done;
  bool records_checked = false;
  const char* records = nullptr;  // pinned host memory: every rank's record

  void wait() override {
    std::string e = error->get();
    if (!e.empty()) throw Error(e);
    if (call.kind == Collective::barrier) {
      // A barrier holds the host until every rank reached it; the watchdog aborts the communicator
      // on a timeout, which ends the wait.
      done.synchronize();
      e = error->get();
      if (!e.empty()) throw Error(e);
      return;
    }
    done.wait(cuda::current_stream(device));
  }
  bool is_completed() override {
    std::string e = error->get();
    if (!e.empty()) throw Error(e);
    return done.query();
  }
};

NcclGroup::NcclGroup(std::shared_ptr<TcpStore> store, int device, std::chrono::milliseconds timeout,
                     const std::string& name, bool check_calls)
    : ProcessGroup(store->rank(), store->world_size(), timeout), store_(std::move(store)), device_(device),
      check_calls_(check_calls && store_->world_size() > 1) {
  cuda::DeviceGuard guard(device_);
  const int64_t generation = store_->add(fmt::format("kiln/nccl/{}/generation/{}", name, rank()), 1);
  const std::string prefix = fmt::format("kiln/nccl/{}/{}/", name, generation);
  ncclUniqueId id;
  if (rank() == 0) {
    KILN_CHECK(ncclGetUniqueId(&id) == ncclSuccess, "dist nccl", "ncclGetUniqueId failed");
    store_->set(prefix + "id", std::string(reinterpret_cast<const char*>(&id), sizeof(id)));
  } else {
    std::string v = store_->get(prefix + "id", timeout);
    KILN_CHECK(v.size() == sizeof(id), "dist nccl", "expected a {}-byte NCCL id from rank 0, found {} bytes", sizeof(id),
               v.size());
    std::memcpy(&id, v.data(), sizeof(id));
  }
  store_->set(prefix + "joined/" + std::to_string(rank()), "1");
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every NCCL call returns; this rank polls and can abort
  ncclResult_t r = ncclCommInitRankConfig(&comm_, size(), id, rank(), &config);
  const auto deadline = Clock::now() + timeout;
  ncclResult_t state = r;
  while (state == ncclInProgress && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ncclCommGetAsyncError(comm_, &state);
  }
  if (state != ncclSuccess) {
    std::string missing;
    for (int i = 0; i < size(); ++i) {
      if (!store_->contains(prefix + "joined/" + std::to_string(i))) missing += fmt::format(" rank {}", i);
    }
    // NCCL's own words (two ranks on one GPU: "Duplicate GPU detected", ...), read before the abort frees comm_
    const std::string detail = comm_ != nullptr ? ncclGetLastError(comm_) : "";
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    if (state == ncclInProgress)
      KILN_FAIL("dist nccl", "creating the communicator timed out after {}{}", format_duration(timeout),
                missing.empty() ? std::string() : "; never joined:" + missing);
    KILN_FAIL("dist nccl", "creating the communicator failed: {}{}{}", ncclGetErrorString(state), detail.empty() ? "" : ": ",
              detail);
  }
  stream_ = cuda::Stream::create(device_, /*high_priority=*/true);
  if (check_calls_) {
    KILN_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_records_), kRecordSlots * slot_bytes()), "dist nccl");
    cuda::StreamGuard sg(stream_);
    device_records_ = empty({static_cast<int64_t>(kRecordSlots * slot_bytes())}, DType::u8, Device(DeviceType::cuda, device_));
  }
  if (size() > 1)
    monitor_ = std::make_unique<Monitor>(*store_, "nccl/" + name + "/" + std::to_string(generation), rank(), size(),
                                         timeout, [this](const std::string& m) {
                                           (void)cudaSetDevice(device_);  // the monitor's thread: as the watchdog's
                                           fail(m);
                                         });
  watchdog_ = std::thread([this] { watchdog(); });
}

NcclGroup::~NcclGroup() {
  {
    // Let the watchdog see the queued collectives through (or time them out), then stop it.
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return pending_.empty() || aborted_; });
    stop_ = true;
  }
  cv_.notify_all();
  watchdog_.join();
  monitor_.reset();
  {
    std::lock_guard<std::mutex> lock(comm_mutex_);
    if (comm_ != nullptr && !aborted_) {
      cuda::DeviceGuard guard(device_);
      ncclResult_t r = ncclCommFinalize(comm_);
      ncclResult_t state = r;
      const auto deadline = Clock::now() + timeout();
      while (state == ncclInProgress && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ncclCommGetAsyncError(comm_, &state);
      }
      if (state == ncclSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    comm_ = nullptr;
  }
  device_records_ = Tensor();  // back to the allocator while its stream still exists
  stream_ = cuda::Stream();    // the last owner synchronises and destroys it
  if (host_records_ != nullptr) cudaFreeHost(host_records_);
}

void NcclGroup::fail(const std::string& message) {
  std::lock_guard<std::mutex> comm_lock(comm_mutex_);
  std::lock_guard<std::mutex> lock(mutex_);
  error_->set(message);
  if (!aborted_) {
    aborted_ = true;
    if (comm_ != nullptr) {
      cuda::DeviceGuard guard(device_);
      ncclCommAbort(comm_);  // NCCL's kernels on the stream end; the events they guard complete
      comm_ = nullptr;
    }
  }
  cv_.notify_all();
}

void NcclGroup::check(ncclResult_t r, const char* op) {
  ncclResult_t state = r;
  const auto deadline = Clock::now() + timeout();
  while (state == ncclInProgress && Clock::now() < deadline) {
    std::this_thread::yield();
    ncclCommGetAsyncError(comm_, &state);
  }
  if (state == ncclSuccess) return;
  KILN_FAIL(op, "NCCL failed: {}{}", state == ncclInProgress ? "the call did not finish queueing" : ncclGetErrorString(state),
            comm_ != nullptr ? fmt::format(" ({})", ncclGetLastError(comm_)) : std::string());
}

void NcclGroup::enqueue(const Call& call) {
  auto s = static_cast<cudaStream_t>(stream_.handle());
  const char* op = call.name();
  switch (call.kind) {
    case Collective::barrier: {
      Tensor one = ones({1}, DType::f32, Device(DeviceType::cuda, device_));
      check(ncclAllReduce(one.raw_data(), one.raw_data(), 1, ncclFloat32, ncclSum, comm_, s), op);
      return;
    }
    case Collective::all_gather:
      check(ncclAllGather(call.input.raw_data(), call.output.raw_data(), call.input.nbytes(), ncclUint8, comm_, s), op);
      return;
    case Collective::broadcast:
      check(ncclBroadcast(call.output.raw_data(), call.output.raw_data(), call.output.nbytes(), ncclUint8, call.root,
                          comm_, s), op);
      return;
    case Collective::reduce_scatter: {
      const auto count = static_cast<size_t>(call.output.numel());
      if (call.input.dtype() == DType::bf16) {  // summed in f32
        Tensor in = cast(call.input, DType::f32);
        Tensor out = empty(call.output.shape(), DType::f32, call.output.device());
        check(ncclReduceScatter(in.raw_data(), out.raw_data(), count, ncclFloat32, ncclSum, comm_, s), op);
        copy_(call.output, out);
      } else {
        check(ncclReduceScatter(call.input.raw_data(), call.output.raw_data(), count, nccl_dtype(call.input.dtype()),
                                ncclSum, comm_, s), op);
      }
      return;
    }
    case Collective::all_reduce: {
      const Tensor& t = call.output;
      const auto count = static_cast<size_t>(t.numel());
      if (call.op == ReduceOp::sum && t.dtype() == DType::bf16) {  // summed in f32
        Tensor t32 = cast(t, DType::f32);
        check(ncclAllReduce(t32.raw_data(), t32.raw_data(), count, ncclFloat32, ncclSum, comm_, s), op);
        copy_(t, t32);
      } else if (call.op == ReduceOp::sum || t.dtype() == DType::i64) {
        check(ncclAllReduce(t.raw_data(), t.raw_data(), count, nccl_dtype(t.dtype()),
                            call.op == ReduceOp::sum ? ncclSum : ncclMax, comm_, s), op);
      } else {
        // NCCL's max drops NaN (fmax): carry a NaN flag per element beside it.
        Tensor nan = cast(ne(t, t), DType::u8);
        check(ncclAllReduce(nan.raw_data(), nan.raw_data(), count, ncclUint8, ncclMax, comm_, s), op);
        check(ncclAllReduce(t.raw_data(), t.raw_data(), count, nccl_dtype(t.dtype()), ncclMax, comm_, s), op);
        copy_(t, where(cast(nan, DType::boolean), full_like(t, std::numeric_limits<double>::quiet_NaN()), t));
      }
      return;
    }
  }
}

Work NcclGroup::run(Call call) {
  const Tensor& t = call.output.defined() ? call.output : call.input;
  KILN_CHECK(!t.defined() || t.device().index == device_, call.name(),
             "expected tensors on cuda:{} (this rank's device), found {}", device_, t.device().str());
  if (monitor_) {
    std::string known = monitor_->known_failure(call);
    if (!known.empty()) fail(known);
  }
  auto work = std::make_shared<NcclWork>();
  work->error = error_;
  work->device = device_;
  // What the watchdog and the monitor name it by, without the tensors: a finished collective's memory
  // goes back to the allocator when its caller drops it (record_stream below keeps it from reuse until
  // `done`), not at the watchdog's next tick.
  work->call = Call{call.kind, Tensor(), Tensor(), call.op, call.root, call.seq};
  work->deadline = Clock::now() + timeout();
  {
    // At most kRecordSlots calls in flight (their record slots are reused round robin).
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return pending_.size() < kRecordSlots || aborted_; });
    if (aborted_) KILN_FAIL(call.name(), "the process group was aborted: {}", error_->get());
  }
  cuda::DeviceGuard guard(device_);
  cuda::Event ready;
  ready.record(cuda::current_stream(device_));  // the caller's inputs are ready
  {
    std::lock_guard<std::mutex> lock(comm_mutex_);
    KILN_CHECK(comm_ != nullptr, call.name(), "the process group was aborted: {}", error());
    cuda::StreamGuard sg(stream_);  // kiln ops below (casts, NaN flags) run on the group's stream
    ready.wait(stream_);
    auto s = static_cast<cudaStream_t>(stream_.handle());
    if (check_calls_) {
      const size_t slot = (call.seq % kRecordSlots) * slot_bytes();
      char* host = host_records_ + slot;
      auto* dev = static_cast<char*>(device_records_.raw_data()) + slot;
      CallRecord mine = make_record(call);
      std::memcpy(host, &mine, sizeof(mine));
      KILN_CUDA_CHECK(cudaMemcpyAsync(dev, host, sizeof(mine), cudaMemcpyHostToDevice, s), call.name());
      check(ncclAllGather(dev, dev + sizeof(mine), sizeof(mine), ncclUint8, comm_, s), call.name());
      KILN_CUDA_CHECK(cudaMemcpyAsync(host + sizeof(mine), dev + sizeof(mine), sizeof(mine) * static_cast<size_t>(size()),
                                      cudaMemcpyDeviceToHost, s), call.name());
      work->records_ready.record(stream_);
      work->records = host + sizeof(mine);
    }
    if (monitor_) monitor_->started(call);
    if (!(call.input.defined() && call.input.nbytes() == 0)) enqueue(call);
    work->done.record(stream_);
  }
  // The caller's memory is in use on the group's stream until `done`.
  if (call.input.defined()) cuda::record_stream(call.input.storage(), stream_);
  if (call.output.defined()) cuda::record_stream(call.output.storage(), stream_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back(work);
  }
  cv_.notify_all();
  return Work(work);
}

void NcclGroup::watchdog() {
  // This thread's CUDA calls (event queries, the abort) are for the group's device: set it once, so that
  // no guard restores a fresh thread's default device 0 (cudaSetDevice makes a context there). The
  // device was set up by the constructor, so this does not fail (and a thread must not throw).
  (void)cudaSetDevice(device_);
  const auto tick = std::clamp<std::chrono::milliseconds>(timeout() / 20, std::chrono::milliseconds(5),
                                                          std::chrono::milliseconds(100));
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    cv_.wait_for(lock, tick, [&] { return stop_; });
    if (aborted_) {
      pending_.clear();  // their events completed or never will; waiters see error_
      cv_.notify_all();
      continue;
    }
    std::string failure;
    while (!pending_.empty() && failure.empty()) {
      std::shared_ptr<NcclWork> w = pending_.front();
      lock.unlock();
      try {
        if (check_calls_ && !w->records_checked && w->records_ready.query()) {
          std::vector<CallRecord> all(static_cast<size_t>(size()));
          std::memcpy(all.data(), w->records, sizeof(CallRecord) * all.size());
          failure = compare_records(all);
          w->records_checked = true;
        }
        if (failure.empty() && w->done.query()) {
          if (monitor_) monitor_->finished(w->call);
          lock.lock();
          pending_.pop_front();
          cv_.notify_all();
          continue;
        }
        if (failure.empty() && Clock::now() > w->deadline) {
          failure = monitor_ ? monitor_->diagnose(w->call, "the NCCL collective did not finish", true)
                             : fmt::format("[{}] timed out after {} in collective #{}", w->call.name(),
                                           format_duration(timeout()), w->call.seq);
        }
      } catch (const std::exception& e) {
        failure = fmt::format("[{}] {}", w->call.name(), e.what());
      }
      lock.lock();
      break;
    }
    if (failure.empty() && comm_ != nullptr) {
      ncclResult_t async = ncclSuccess;
      std::shared_ptr<NcclWork> oldest = pending_.empty() ? nullptr : pending_.front();
      lock.unlock();
      {
        std::lock_guard<std::mutex> comm_lock(comm_mutex_);
        if (comm_ != nullptr) ncclCommGetAsyncError(comm_, &async);
      }
      if (async != ncclSuccess && async != ncclInProgress) {
        // NCCL saw a peer fail (a closed socket, a remote error): ask the store which rank it was.
        const std::string what = fmt::format("NCCL: {}", ncclGetErrorString(async));
        if (monitor_ && oldest) failure = monitor_->diagnose(oldest->call, what, false);
        else failure = fmt::format("[dist nccl] the communicator failed: {}", what);
      }
      lock.lock();
    }
    if (!failure.empty()) {
      lock.unlock();
      fail(failure);
      lock.lock();
    }
  }
}

}  // namespace

std::shared_ptr<ProcessGroup> make_nccl_group(std::shared_ptr<TcpStore> store, int device,
                                              std::chrono::milliseconds timeout, const std::string& name,
                                              bool check_calls) {
  KILN_CHECK(store != nullptr, "dist nccl", "expected a store");
  return std::make_shared<NcclGroup>(std::move(store), device, timeout, name, check_calls);
}

}  // namespace kiln::dist

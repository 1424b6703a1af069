// ProcessGroup: the ranks of one job and the collectives between them on kiln tensors (all_gather,
// reduce_scatter, all_reduce, broadcast, barrier), each asynchronous and returning a Work handle.
// Backends (local threads, Gloo, NCCL) implement run(); the checks every backend shares live here.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace kiln::dist {

class Store;

enum class ReduceOp : uint8_t { sum, max };  // max propagates NaN (a NaN on any rank gives NaN)
const char* reduce_op_name(ReduceOp op);

enum class Collective : uint8_t { all_gather, reduce_scatter, all_reduce, broadcast, barrier };
const char* collective_name(Collective c);

// The default timeout of every collective and store wait.
inline constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::minutes(10);

// A pending collective. wait(): on the CPU, blocks until the collective finished and rethrows its
// error; on CUDA, makes the caller's current stream wait for it (an event; the host blocks only until
// the collective is queued). Inputs must not be written, nor outputs read, before wait(). A default-
// constructed Work is complete.
class Work {
 public:
  struct Impl {
    virtual ~Impl() = default;
    virtual void wait() = 0;
    virtual bool is_completed() = 0;  // never blocks; throws if the collective failed
  };
  Work() = default;
  explicit Work(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  void wait() const {
    if (impl_) impl_->wait();
  }
  bool is_completed() const { return !impl_ || impl_->is_completed(); }

 private:
  std::shared_ptr<Impl> impl_;
};

// One collective call as a backend sees it, after the shared checks. `input` is contiguous (copied
// when the caller's was not); `output` is the caller's contiguous tensor (== input for all_reduce
// and broadcast, which work in place; undefined for barrier).
struct Call {
  Collective kind = Collective::barrier;
  Tensor input, output;
  ReduceOp op = ReduceOp::sum;
  int root = 0;
  uint64_t seq = 0;  // this group's n-th collective (0-based), the same on every rank
  const char* name() const { return collective_name(kind); }
};

// A group is driven from one thread per rank: every rank issues the same collectives in the same order.
class ProcessGroup {
 public:
  ProcessGroup(int rank, int size, std::chrono::milliseconds timeout);
  virtual ~ProcessGroup() = default;
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  virtual std::string backend() const = 0;  // "local", "gloo", "nccl"
  // The store the group rendezvoused through (null for groups made without one).
  virtual std::shared_ptr<Store> store() const { return nullptr; }

  // output (size * n, ...) = every rank's input (n, ...) concatenated on dim 0, in rank order; a 0-d
  // input gathers into a (size) output. Any dtype: the bytes travel unchanged.
  Work all_gather(const Tensor& output, const Tensor& input);
  // output (n, ...) = sum over ranks of rows [rank * n, (rank + 1) * n) of each rank's input
  // (size * n, ...). Uneven shards are the caller's padding. f32, bf16 (summed in f32), f64, i64.
  Work reduce_scatter(const Tensor& output, const Tensor& input);
  // tensor = op over ranks of tensor, in place; the same dtypes as reduce_scatter.
  Work all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::sum);
  // tensor = root's tensor, in place; any dtype.
  Work broadcast(const Tensor& tensor, int root = 0);
  Work barrier();

  // Fails every pending and later collective of this rank with `message` (idempotent: the first
  // message stays). Backends also tell the other ranks where they can.
  virtual void abort(const std::string& message) = 0;
  // Throws the group's failure, if it has failed. Call it after reading a collective's result on the host
  // and before acting on it: an NCCL collective aborted after its wait() was queued completes with whatever
  // its buffer held. (The local and Gloo backends fail in wait() itself.)
  virtual void check_ok() {}

 protected:
  virtual Work run(Call call) = 0;
  // Device types the backend accepts; checked before run().
  virtual bool supports(const Device& device) const = 0;

 private:
  Work submit(Call call);
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  uint64_t next_seq_ = 0;
};

// The dtypes reductions accept: f32, bf16, f64, i64.
bool reducible(DType dtype);

}  // namespace kiln::dist

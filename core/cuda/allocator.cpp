// The stream-aware caching allocator behind every CUDA Storage (PyTorch's design, simplified): per
// device, requests round to 512 B; blocks up to 1 MiB come from 2 MiB segments (small pool), larger
// ones from 20 MiB segments (up to 10 MiB) or their own 2 MiB-rounded segment (large pool). Free
// blocks are kept per (stream, size) and found best-fit, split on allocation and merged with free
// neighbours on release. A block is reused only by the stream it was allocated on; streams added
// with record_stream get an event at free time, and the block returns to the pool once all events
// completed. cudaMalloc failure: wait for those events, release cached segments, retry once, then
// throw kiln::Error "[cuda alloc] out of memory ...".
#include <cuda_runtime_api.h>

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/runtime.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

constexpr size_t kMinBlock = 512;                  // every size rounds up to this
constexpr size_t kSmallSize = size_t{1} << 20;     // largest request served by the small pool
constexpr size_t kSmallSegment = size_t{2} << 20;  // segment size of the small pool
constexpr size_t kMidSize = size_t{10} << 20;      // requests up to this share 20 MiB segments
constexpr size_t kMidSegment = size_t{20} << 20;
constexpr size_t kRoundLarge = size_t{2} << 20;    // larger segments round to 2 MiB
constexpr size_t kMaxRequest = size_t{1} << 50;    // beyond this rounding could overflow

constexpr double kMiB = 1024.0 * 1024.0;

enum class State { free, allocated, pending };  // pending: freed, waiting for record_stream events

struct Block {
  char* ptr = nullptr;
  size_t size = 0;
  cudaStream_t stream = nullptr;  // the stream it was allocated for (all blocks of a segment share it)
  bool small = false;
  State state = State::free;
  Block* prev = nullptr;  // neighbours inside the segment
  Block* next = nullptr;
  std::vector<cudaStream_t> stream_uses;  // other streams it was used on (record_stream)
  int pending_events = 0;
};

struct BlockOrder {
  bool operator()(const Block* a, const Block* b) const {
    if (a->stream != b->stream) return a->stream < b->stream;
    if (a->size != b->size) return a->size < b->size;
    return a->ptr < b->ptr;
  }
};
using Pool = std::set<Block*, BlockOrder>;

size_t round_size(size_t n) { return n < kMinBlock ? kMinBlock : (n + kMinBlock - 1) / kMinBlock * kMinBlock; }
size_t segment_size(size_t n) {
  if (n <= kSmallSize) return kSmallSegment;
  if (n <= kMidSize) return kMidSegment;
  return (n + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
}

class DeviceAllocator {
 public:
  explicit DeviceAllocator(int device) : device_(device) {}

  void* allocate(size_t nbytes, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.num_allocs;
    if (nbytes == 0) return nullptr;
    if (nbytes > kMaxRequest) oom(nbytes);
    process_events();
    const size_t size = round_size(nbytes);
    Pool& pool = size <= kSmallSize ? small_ : large_;
    Block* b = take_free(pool, stream, size);
    if (b == nullptr) b = new_segment(nbytes, size, stream);
    if (b->size - size >= (b->small ? kMinBlock : kSmallSize + 1)) split(b, size, pool);
    b->state = State::allocated;
    allocated_[b->ptr] = b;
    stats_.allocated += b->size;
    stats_.peak_allocated = std::max(stats_.peak_allocated, stats_.allocated);
    return b->ptr;
  }

  void deallocate(void* ptr) {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = allocated_.find(static_cast<char*>(ptr));
    if (it == allocated_.end()) return;  // not ours (cannot happen through Storage)
    Block* b = it->second;
    allocated_.erase(it);
    stats_.allocated -= b->size;
    if (b->stream_uses.empty()) {
      release(b);
      return;
    }
    // Fence the other streams: the block is free once the work queued on them so far is done.
    int previous = -1;
    cudaGetDevice(&previous);
    if (previous != device_) cudaSetDevice(device_);
    for (cudaStream_t s : b->stream_uses) {
      cudaEvent_t e = get_event();
      if (e != nullptr && cudaEventRecord(e, s) == cudaSuccess) {
        pending_.emplace_back(e, b);
        ++b->pending_events;
      } else {
        cudaGetLastError();
        if (e != nullptr) cudaEventDestroy(e);
      }
    }
    if (previous != device_ && previous >= 0) cudaSetDevice(previous);
    b->stream_uses.clear();
    if (b->pending_events == 0) {
      release(b);  // recording failed (shutdown): nothing left to wait for
    } else {
      b->state = State::pending;
    }
  }

  void record_stream(void* ptr, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    // The block holding ptr: exact for a Storage from allocate(), interior for views of one.
    auto it = allocated_.upper_bound(static_cast<char*>(ptr));
    if (it == allocated_.begin()) return;
    --it;
    Block* b = it->second;
    if (static_cast<char*>(ptr) >= b->ptr + b->size || stream == b->stream) return;
    if (std::find(b->stream_uses.begin(), b->stream_uses.end(), stream) == b->stream_uses.end())
      b->stream_uses.push_back(stream);
  }

  MemoryStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_allocated = stats_.allocated;
    stats_.peak_reserved = stats_.reserved;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    DeviceGuard guard(device_);
    synchronize_events();
    release_cached_segments();
  }

 private:
  // Best fit among the free blocks of `stream`: the smallest one of at least `size` bytes.
  Block* take_free(Pool& pool, cudaStream_t stream, size_t size) {
    Block key;
    key.stream = stream;
    key.size = size;
    auto it = pool.lower_bound(&key);
    if (it == pool.end() || (*it)->stream != stream) return nullptr;
    Block* b = *it;
    pool.erase(it);
    return b;
  }

  Block* new_segment(size_t nbytes, size_t size, cudaStream_t stream) {
    const size_t seg = segment_size(size);
    DeviceGuard guard(device_);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, seg);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the allocation error; the context stays usable
      // Under pressure: blocks waiting for events may be free now, or be after a wait.
      synchronize_events();
      Pool& pool = size <= kSmallSize ? small_ : large_;
      if (Block* b = take_free(pool, stream, size)) return b;
      release_cached_segments();
      err = cudaMalloc(&p, seg);
      if (err != cudaSuccess) {
        cudaGetLastError();
        oom(nbytes);
      }
    }
    ++stats_.num_cuda_mallocs;
    stats_.reserved += seg;
    stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
    Block* b = new Block;
    b->ptr = static_cast<char*>(p);
    b->size = seg;
    b->stream = stream;
    b->small = size <= kSmallSize;
    return b;
  }

  [[noreturn]] void oom(size_t nbytes) {
    ++stats_.num_ooms;
    size_t free_b = 0, total_b = 0;
    {
      int previous = -1;
      cudaGetDevice(&previous);
      cudaSetDevice(device_);
      if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) cudaGetLastError();
      if (previous >= 0) cudaSetDevice(previous);
    }
    throw Error(fmt::format(
        "[cuda alloc] out of memory: requested {:.2f} MiB on cuda:{}; allocated {:.2f} MiB, reserved {:.2f} MiB, "
        "free {:.2f} MiB of {:.2f} MiB",
        static_cast<double>(nbytes) / kMiB, device_, static_cast<double>(stats_.allocated) / kMiB,
        static_cast<double>(stats_.reserved) / kMiB, static_cast<double>(free_b) / kMiB,
        static_cast<double>(total_b) / kMiB));
  }

  // Cuts b to `size` bytes; the rest becomes a free block of the same segment.
  void split(Block* b, size_t size, Pool& pool) {
    Block* rest = new Block;
    rest->ptr = b->ptr + size;
    rest->size = b->size - size;
    rest->stream = b->stream;
    rest->small = b->small;
    rest->prev = b;
    rest->next = b->next;
    if (b->next != nullptr) b->next->prev = rest;
    b->next = rest;
    b->size = size;
    pool.insert(rest);
  }

  // Returns b to its pool, merged with free neighbours.
  void release(Block* b) {
    Pool& pool = b->small ? small_ : large_;
    b->state = State::free;
    if (Block* p = b->prev; p != nullptr && p->state == State::free) {
      pool.erase(p);
      p->size += b->size;
      p->next = b->next;
      if (b->next != nullptr) b->next->prev = p;
      delete b;
      b = p;
    }
    if (Block* n = b->next; n != nullptr && n->state == State::free) {
      pool.erase(n);
      b->size += n->size;
      b->next = n->next;
      if (n->next != nullptr) n->next->prev = b;
      delete n;
    }
    pool.insert(b);
  }

  // Blocks whose record_stream events all completed go back to their pools.
  void process_events() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      cudaError_t e = cudaEventQuery(it->first);
      if (e == cudaErrorNotReady) {
        cudaGetLastError();
        ++it;
        continue;
      }
      if (e != cudaSuccess) cudaGetLastError();
      finish_event(*it);
      it = pending_.erase(it);
    }
  }

  void synchronize_events() {
    for (auto& pe : pending_) {
      if (cudaEventSynchronize(pe.first) != cudaSuccess) cudaGetLastError();
      finish_event(pe);
    }
    pending_.clear();
  }

  void finish_event(std::pair<cudaEvent_t, Block*>& pe) {
    events_.push_back(pe.first);
    Block* b = pe.second;
    if (--b->pending_events == 0) release(b);
  }

  cudaEvent_t get_event() {
    if (!events_.empty()) {
      cudaEvent_t e = events_.back();
      events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return e;
  }

  // cudaFree of every segment that is one whole free block (the current device is device_).
  void release_cached_segments() {
    for (Pool* pool : {&small_, &large_}) {
      for (auto it = pool->begin(); it != pool->end();) {
        Block* b = *it;
        if (b->prev != nullptr || b->next != nullptr) {
          ++it;
          continue;
        }
        if (cudaFree(b->ptr) != cudaSuccess) cudaGetLastError();
        ++stats_.num_cuda_frees;
        stats_.reserved -= b->size;
        delete b;
        it = pool->erase(it);
      }
    }
  }

  const int device_;
  std::mutex mu_;
  Pool small_, large_;
  std::map<char*, Block*> allocated_;  // ordered, so interior pointers find their block
  std::deque<std::pair<cudaEvent_t, Block*>> pending_;
  std::vector<cudaEvent_t> events_;  // recycled
  MemoryStats stats_;
};

class CachingAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes, Device device) override {
    DeviceAllocator& a = get(device.index);
    return a.allocate(nbytes, static_cast<cudaStream_t>(current_stream(device.index).handle()));
  }
  void deallocate(void* ptr, size_t, Device device) override {
    if (ptr == nullptr) return;
    if (DeviceAllocator* a = find(device.index)) a->deallocate(ptr);
  }

  DeviceAllocator& get(int device) {
    init();
    KILN_CHECK(device >= 0 && device < static_cast<int>(devices_.size()), "cuda alloc",
               "device cuda:{} does not exist ({} CUDA devices visible)", device, devices_.size());
    return *devices_[static_cast<size_t>(device)];
  }
  DeviceAllocator* find(int device) {
    init();
    return device >= 0 && device < static_cast<int>(devices_.size()) ? devices_[static_cast<size_t>(device)].get()
                                                                       : nullptr;
  }
  std::vector<std::unique_ptr<DeviceAllocator>>& devices() {
    init();
    return devices_;
  }

 private:
  void init() {
    std::call_once(once_, [this] {
      int n = device_count();
      for (int d = 0; d < n; ++d) devices_.push_back(std::make_unique<DeviceAllocator>(d));
    });
  }
  std::once_flag once_;
  std::vector<std::unique_ptr<DeviceAllocator>> devices_;
};

// Never destroyed: storages freed during static destruction still find it.
CachingAllocator& instance() {
  static CachingAllocator* a = new CachingAllocator;
  return *a;
}

int resolve(int device) { return device < 0 ? current_device() : device; }

}  // namespace

Allocator* caching_allocator() { return &instance(); }

KILN_REGISTER(cuda_caching_allocator) { set_allocator(DeviceType::cuda, caching_allocator()); }

MemoryStats memory_stats(int device) { return instance().get(resolve(device)).stats(); }

void reset_peak_memory_stats(int device) { instance().get(resolve(device)).reset_peak(); }

void empty_cache() {
  for (auto& d : instance().devices()) d->empty_cache();
}

void record_stream(const Storage& storage, const Stream& s) {
  if (storage == nullptr || storage->data() == nullptr || !storage->device().is_cuda()) return;
  KILN_CHECK(storage->device().index == s.device(), "cuda alloc", "record_stream of memory on cuda:{} with a stream of cuda:{}",
             storage->device().index, s.device());
  instance().get(s.device()).record_stream(storage->data(), static_cast<cudaStream_t>(s.handle()));
}

}  // namespace kiln::cuda

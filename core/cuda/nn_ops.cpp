// Host side of the fused neural-network kernels (core/cuda/nn.cu): unpacks tensors into row
// descriptors, allocates scratch from kiln's allocator, launches on the device's current stream and
// registers the kernels. Index checks (embedding ids, cross-entropy targets) are done by the kernels
// themselves, which flag the first bad position in a device word; the host then waits for the stream
// (one synchronisation per call of these ops) and raises the same kiln::Error as the CPU backend.
// Cross-entropy skips the check (no word, no synchronisation) when its primitive says check_targets =
// false: cross_entropy_unchecked, and every backward (its forward checked the same targets).
#include <cuda_runtime_api.h>

#include <array>
#include <optional>

#include "core/cuda/check.h"
#include "core/cuda/nn.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/layout.h"
#include "core/ops/nn.h"

namespace kiln::cuda {
namespace {

Shape lead_of(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

// The device word index-checking kernels flag into (kNoError when nothing is wrong).
class IndexCheck {
 public:
  IndexCheck(const Tensor& like, void* stream, const char* op)
      : word_(empty({1}, DType::i64, like.device())), stream_(static_cast<cudaStream_t>(stream)), op_(op) {
    KILN_CUDA_CHECK(cudaMemsetAsync(word_.raw_data(), 0x7f, sizeof(unsigned long long), stream_), op_);
  }
  unsigned long long* ptr() const { return static_cast<unsigned long long*>(word_.raw_data()); }

  // Waits for the stream; the smallest flagged position, or -1.
  int64_t first_bad() const {
    thread_local unsigned long long* host = nullptr;  // pinned, kept for the thread
    if (host == nullptr) {
      KILN_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(unsigned long long), cudaHostAllocPortable),
                      op_);
    }
    KILN_CUDA_CHECK(cudaMemcpyAsync(host, ptr(), sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream_), op_);
    KILN_CUDA_CHECK(cudaStreamSynchronize(stream_), op_);
    return *host == kNoError ? -1 : static_cast<int64_t>(*host);
  }

 private:
  Tensor word_;
  cudaStream_t stream_;
  const char* op_;
};

// The value of an i64/i32 tensor at a flat (row-major) position, read from the device.
int64_t index_at(const Tensor& t, int64_t pos, const char* op) {
  int64_t off = 0, rem = pos;
  for (size_t d = t.shape().size(); d-- > 0;) {
    off += (rem % t.shape()[d]) * t.strides()[d];
    rem /= t.shape()[d];
  }
  const char* p = static_cast<const char*>(t.raw_data()) + off * static_cast<int64_t>(itemsize(t.dtype()));
  if (t.dtype() == DType::i64) {
    int64_t v = 0;
    KILN_CUDA_CHECK(cudaMemcpy(&v, p, sizeof(v), cudaMemcpyDeviceToHost), op);
    return v;
  }
  int32_t v = 0;
  KILN_CUDA_CHECK(cudaMemcpy(&v, p, sizeof(v), cudaMemcpyDeviceToHost), op);
  return v;
}

int reduction_code(Reduction r) { return r == Reduction::none ? 0 : (r == Reduction::sum ? 1 : 2); }

DType compute_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

// ---- embedding

void embedding_kernel(const prim::Embedding&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const char* op = "embedding";
  const Tensor &w = in[0], &ids = in[1];  // (V, D), (...)
  const int64_t v = w.size(0), d = w.size(1), n = ids.numel();
  if (n == 0) return;
  DeviceGuard guard(w.device().index);
  void* stream = stream_of(out[0]);
  const Strided<1> pos = make_strided<1>(ids.shape(), {&ids}, op);
  IndexCheck check(w, stream, op);
  KILN_CUDA_CHECK(launch_embedding(w.dtype(), ids.dtype(), w.raw_data(), v, d, w.strides()[0], w.strides()[1],
                                   ids.raw_data(), pos, n, out[0].raw_data(), check.ptr(), stream),
                  op);
  if (d == 0) return;
  const int64_t bad = check.first_bad();
  KILN_CHECK(bad < 0, op, "id {} (at flat position {}) is out of range for V = {} embeddings", index_at(ids, bad, op),
             bad, v);
}

void embedding_backward_kernel(const prim::EmbeddingBackward& p, const std::vector<Tensor>& in,
                               std::vector<Tensor>& out) {
  const char* op = "embedding_backward";
  const Tensor &g = in[0], &ids = in[1];  // (..., D), (...)
  const int64_t v = p.num_embeddings(), d = g.size(-1), n = ids.numel();
  KILN_CHECK(n < (int64_t{1} << 31) && v < (int64_t{1} << 31), op, "supports fewer than 2^31 ids and rows, found {} and {}",
             n, v);
  DeviceGuard guard(g.device().index);
  void* stream = stream_of(out[0]);
  const Strided<1> pos = make_strided<1>(ids.shape(), {&ids}, op);
  const Strided<1> grows = make_strided<1>(ids.shape(), {lead_of(g.strides())}, op);
  const size_t bytes = embedding_backward_workspace(n);
  Tensor scratch = empty({static_cast<int64_t>(bytes)}, DType::u8, g.device());
  IndexCheck check(g, stream, op);
  KILN_CUDA_CHECK(launch_embedding_backward(g.dtype(), ids.dtype(), g.raw_data(), grows, g.strides().back(),
                                            ids.raw_data(), pos, n, v, d, out[0].raw_data(), scratch.raw_data(), bytes,
                                            check.ptr(), stream),
                  op);
  if (n == 0 || d == 0) return;
  const int64_t bad = check.first_bad();
  KILN_CHECK(bad < 0, op, "id {} (at flat position {}) is out of range for V = {} embeddings", index_at(ids, bad, op),
             bad, v);
}

// ---- rms_norm

void rms_norm_kernel(const prim::RmsNorm& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1];  // (..., D), (D)
  const int64_t d = x.size(-1), r = d == 0 ? 0 : x.numel() / d;
  if (r == 0) return;
  DeviceGuard guard(x.device().index);
  const Strided<1> rows = make_strided<1>(lead_of(x.shape()), {lead_of(x.strides())}, p.name());
  KILN_CUDA_CHECK(launch_rms_norm(x.dtype(), x.raw_data(), rows, x.strides().back(), w.raw_data(), w.strides()[0], r, d,
                                  p.eps(), out[0].raw_data(), stream_of(out[0])),
                  p.name());
}

void rms_norm_backward_kernel(const prim::RmsNormBackward& p, const std::vector<Tensor>& in,
                              std::vector<Tensor>& out) {
  const Tensor &x = in[0], &w = in[1], &g = in[2];  // (..., D), (D), (..., D)
  const int64_t d = x.size(-1), r = d == 0 ? 0 : x.numel() / d;
  if (d == 0) return;
  DeviceGuard guard(x.device().index);
  const Strided<2> rows = make_strided<2>(lead_of(x.shape()), {lead_of(x.strides()), lead_of(g.strides())}, p.name());
  const size_t bytes = rms_norm_backward_workspace(x.dtype(), r, d);
  Tensor partial = empty({static_cast<int64_t>(bytes)}, DType::u8, x.device());  // (blocks, D) f32/f64
  KILN_CUDA_CHECK(launch_rms_norm_backward(x.dtype(), x.raw_data(), g.raw_data(), rows, x.strides().back(),
                                           g.strides().back(), w.raw_data(), w.strides()[0], r, d, p.eps(),
                                           out[0].raw_data(), out[1].raw_data(), partial.raw_data(), stream_of(out[0])),
                  p.name());
}

// ---- rotary_embedding

void rotary_kernel(const prim::RotaryEmbedding& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &cos = in[1], &sin = in[2];  // (..., T, D), (..., T, D/2) x2
  const int64_t h = x.size(-1) / 2, r = h == 0 ? 0 : x.numel() / (2 * h);
  if (r == 0) return;
  DeviceGuard guard(x.device().index);
  Shape half = x.shape();
  half.back() = h;
  const Shape cst = broadcast_strides(cos, half), sst = broadcast_strides(sin, half);
  const Strided<3> rows = make_strided<3>(lead_of(half), {lead_of(x.strides()), lead_of(cst), lead_of(sst)}, p.name());
  KILN_CUDA_CHECK(launch_rotary(x.dtype(), cos.dtype(), x.raw_data(), cos.raw_data(), sin.raw_data(), rows,
                                x.strides().back(), cst.back(), sst.back(), r, h, out[0].raw_data(), stream_of(out[0])),
                  p.name());
}

// ---- cross_entropy

void check_targets(const IndexCheck& check, const Tensor& targets, int64_t v, int64_t ignore, const char* op) {
  const int64_t bad = check.first_bad();
  KILN_CHECK(bad < 0, op, "target {} at row {} is out of range [0, {}) and is not ignore_index ({})",
             index_at(targets, bad, op), bad, v, ignore);
}

void cross_entropy_kernel(const prim::CrossEntropy& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const char* op = "cross_entropy";
  const Tensor &logits = in[0], &targets = in[1];  // (N, V), (N)
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0 && p.reduction() == Reduction::none) return;
  DeviceGuard guard(logits.device().index);
  void* stream = stream_of(out[0]);
  Tensor scratch = empty({n + 1}, compute_dtype(logits.dtype()), logits.device());  // per-row losses
  std::optional<IndexCheck> check;
  if (p.check_targets()) check.emplace(logits, stream, op);
  KILN_CUDA_CHECK(launch_cross_entropy(logits.dtype(), targets.dtype(), logits.raw_data(), n, v, logits.strides()[0],
                                       logits.strides()[1], targets.raw_data(), targets.strides()[0], p.ignore_index(),
                                       reduction_code(p.reduction()), out[0].raw_data(), scratch.raw_data(),
                                       check ? check->ptr() : nullptr, stream),
                  op);
  if (check && n > 0) check_targets(*check, targets, v, p.ignore_index(), op);
}

void cross_entropy_backward_kernel(const prim::CrossEntropyBackward& p, const std::vector<Tensor>& in,
                                   std::vector<Tensor>& out) {
  const char* op = "cross_entropy_backward";
  const Tensor &logits = in[0], &targets = in[1];  // (N, V), (N)
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0 || v == 0) return;
  DeviceGuard guard(logits.device().index);
  void* stream = stream_of(out[0]);
  const DType ct = compute_dtype(logits.dtype());
  const Tensor g = in[2].dtype() == ct ? in[2] : cast(in[2], ct);  // (N) or 0-d
  const int64_t gstride = g.dim() == 1 ? g.strides()[0] : 0;
  Tensor count = empty({1}, ct, logits.device());  // non-ignored rows, for the mean
  std::optional<IndexCheck> check;
  if (p.check_targets()) check.emplace(logits, stream, op);
  KILN_CUDA_CHECK(launch_cross_entropy_backward(logits.dtype(), targets.dtype(), logits.raw_data(), n, v,
                                                logits.strides()[0], logits.strides()[1], targets.raw_data(),
                                                targets.strides()[0], p.ignore_index(), reduction_code(p.reduction()),
                                                g.raw_data(), gstride, out[0].raw_data(), count.raw_data(),
                                                check ? check->ptr() : nullptr, stream),
                  op);
  if (check) check_targets(*check, targets, v, p.ignore_index(), op);
}

// ---- swiglu

void swiglu_kernel(const prim::SwiGlu& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1];
  Tensor& y = out[0];
  if (y.numel() == 0) return;
  DeviceGuard guard(y.device().index);
  if (gate.is_contiguous() && up.is_contiguous()) {
    KILN_CUDA_CHECK(launch_swiglu(y.dtype(), gate.raw_data(), up.raw_data(), y.raw_data(), y.numel(), nullptr,
                                  stream_of(y)),
                    p.name());
    return;
  }
  const Strided<3> st = make_strided<3>(y.shape(), {&y, &gate, &up}, p.name());
  KILN_CUDA_CHECK(launch_swiglu(y.dtype(), gate.raw_data(), up.raw_data(), y.raw_data(), y.numel(), &st, stream_of(y)),
                  p.name());
}

void swiglu_backward_kernel(const prim::SwiGluBackward& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &gate = in[0], &up = in[1], &g = in[2];
  Tensor &dgate = out[0], &dup = out[1];
  if (dgate.numel() == 0) return;
  DeviceGuard guard(dgate.device().index);
  const bool contiguous = gate.is_contiguous() && up.is_contiguous() && g.is_contiguous();
  Strided<5> st;
  if (!contiguous) {
    const Shape dense = contiguous_strides(dgate.shape());
    st = make_strided<5>(dgate.shape(), {dense, dense, gate.strides(), up.strides(), g.strides()}, p.name());
  }
  KILN_CUDA_CHECK(launch_swiglu_backward(dgate.dtype(), gate.raw_data(), up.raw_data(), g.raw_data(), dgate.raw_data(),
                                         dup.raw_data(), dgate.numel(), contiguous ? nullptr : &st, stream_of(dgate)),
                  p.name());
}

}  // namespace

KILN_REGISTER(cuda_nn_kernels) {
  register_kernel<prim::Embedding>(DeviceType::cuda, &embedding_kernel);
  register_kernel<prim::EmbeddingBackward>(DeviceType::cuda, &embedding_backward_kernel);
  register_kernel<prim::RmsNorm>(DeviceType::cuda, &rms_norm_kernel);
  register_kernel<prim::RmsNormBackward>(DeviceType::cuda, &rms_norm_backward_kernel);
  register_kernel<prim::RotaryEmbedding>(DeviceType::cuda, &rotary_kernel);
  register_kernel<prim::CrossEntropy>(DeviceType::cuda, &cross_entropy_kernel);
  register_kernel<prim::CrossEntropyBackward>(DeviceType::cuda, &cross_entropy_backward_kernel);
  register_kernel<prim::SwiGlu>(DeviceType::cuda, &swiglu_kernel);
  register_kernel<prim::SwiGluBackward>(DeviceType::cuda, &swiglu_backward_kernel);
}

}  // namespace kiln::cuda

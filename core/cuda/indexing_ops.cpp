// Host side of the embedding kernels (core/cuda/indexing.cu): unpacks tensors into position
// descriptors, allocates the backward's sort scratch from kiln's allocator, launches on the device's
// current stream and registers the kernels. The kernels flag bad ids; the host then waits for the
// stream (one synchronisation per call) and raises the same kiln::Error as the CPU backend.
#include <cuda_runtime_api.h>

#include "core/cuda/check.h"
#include "core/cuda/index_check.h"
#include "core/cuda/indexing.cuh"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/indexing.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

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

}  // namespace

KILN_REGISTER(cuda_indexing_kernels) {
  register_kernel<prim::Embedding>(DeviceType::cuda, &embedding_kernel);
  register_kernel<prim::EmbeddingBackward>(DeviceType::cuda, &embedding_backward_kernel);
}

}  // namespace kiln::cuda

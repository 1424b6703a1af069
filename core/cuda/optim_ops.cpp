// Host side of the CUDA optimiser family: prim::AdamWStep builds the per-tensor table (pointers,
// sizes, chunk offsets, bias corrections), uploads it in one copy and runs launch_adamw once;
// prim::MultiTensorL2Norm / MultiTensorScale do the same with a table of MultiTensorEntry.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/optim.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/optim.h"

namespace kiln::cuda {
namespace {

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void adamw_kernel(const prim::AdamWStep& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const size_t n = in.size();
  const Device dev = in[0].device();
  DeviceGuard guard(dev.index);
  const DType dtype = in[0].dtype();
  const size_t vec_bytes = 4 * itemsize(dtype);
  std::vector<AdamWTensor> table;  // (count) tensors with elements
  table.reserve(n);
  int64_t chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const Tensor &g = in[i], &p = out[i], &m = out[n + i], &v = out[2 * n + i];
    KILN_CHECK(g.is_contiguous() && p.is_contiguous() && m.is_contiguous() && v.is_contiguous(), "adamw_step",
               "tensor {}: param, grad and state must be contiguous", i);
    if (p.numel() == 0) continue;
    AdamWTensor t{};
    t.p = p.raw_data();
    t.g = g.raw_data();
    t.m = static_cast<float*>(m.raw_data());
    t.v = static_cast<float*>(v.raw_data());
    t.n = p.numel();
    t.chunk_begin = chunks;
    t.step_size = op.step_size(i);
    t.bc2_sqrt = op.bias_correction2_sqrt(i);
    t.vectorized = aligned(t.p, vec_bytes) && aligned(t.g, vec_bytes) && aligned(t.m, 16) && aligned(t.v, 16);
    chunks += (t.n + kAdamWChunk - 1) / kAdamWChunk;
    table.push_back(t);
  }
  if (table.empty()) return;
  const AdamWHyper& h = op.hyper();
  const AdamWScalars s{op.decay(), static_cast<float>(1.0 - h.beta1), static_cast<float>(h.beta2),
                       static_cast<float>(1.0 - h.beta2), static_cast<float>(h.eps)};
  const size_t bytes = table.size() * sizeof(AdamWTensor);
  // The table lives in a device buffer from the caching allocator, freed in stream order after the
  // launch; the pageable copy is staged by the driver before cudaMemcpyAsync returns.
  Tensor dtable = empty({static_cast<int64_t>(bytes)}, DType::u8, dev);
  void* stream = stream_of(in[0]);
  KILN_CUDA_CHECK(cudaMemcpyAsync(dtable.raw_data(), table.data(), bytes, cudaMemcpyHostToDevice,
                                  static_cast<cudaStream_t>(stream)),
                  "adamw_step");
  KILN_CUDA_CHECK(launch_adamw(static_cast<const AdamWTensor*>(dtable.raw_data()), static_cast<int>(table.size()),
                               chunks, dtype, s, stream),
                  "adamw_step");
}

// The table of the non-empty tensors (contiguous, checked) and its total chunk count.
std::vector<MultiTensorEntry> entry_table(const std::vector<Tensor>& ts, const char* op, int64_t& chunks) {
  std::vector<MultiTensorEntry> table;  // (count)
  table.reserve(ts.size());
  chunks = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    if (t.numel() == 0) continue;
    KILN_CHECK(t.is_contiguous(), op, "tensor {} must be contiguous", i);
    MultiTensorEntry e{};
    e.x = t.raw_data();
    e.n = t.numel();
    e.chunk_begin = chunks;
    e.dtype = t.dtype();
    e.vectorized = aligned(e.x, 4 * itemsize(t.dtype()));
    chunks += (e.n + kAdamWChunk - 1) / kAdamWChunk;
    table.push_back(e);
  }
  return table;
}

// The table in a device buffer from the caching allocator (freed in stream order after the launch).
Tensor upload(const std::vector<MultiTensorEntry>& table, Device dev, void* stream, const char* op) {
  const size_t bytes = table.size() * sizeof(MultiTensorEntry);
  Tensor dtable = empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, DType::u8, dev);
  if (bytes > 0) {
    KILN_CUDA_CHECK(cudaMemcpyAsync(dtable.raw_data(), table.data(), bytes, cudaMemcpyHostToDevice,
                                    static_cast<cudaStream_t>(stream)),
                    op);
  }
  return dtable;
}

void l2_norm_kernel(const prim::MultiTensorL2Norm& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Device dev = in[0].device();
  DeviceGuard guard(dev.index);
  int64_t chunks = 0;
  const std::vector<MultiTensorEntry> table = entry_table(in, op.name(), chunks);
  void* stream = stream_of(out[0]);
  const Tensor dtable = upload(table, dev, stream, op.name());
  Tensor partials = empty({std::max<int64_t>(chunks, 1)}, DType::f32, dev);  // (chunks) sums of squares
  KILN_CUDA_CHECK(launch_multi_tensor_l2_norm(static_cast<const MultiTensorEntry*>(dtable.raw_data()),
                                              static_cast<int>(table.size()), chunks,
                                              static_cast<float*>(partials.raw_data()),
                                              static_cast<float*>(out[0].raw_data()), stream),
                  op.name());
}

void scale_kernel(const prim::MultiTensorScale& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const Device dev = out[0].device();
  DeviceGuard guard(dev.index);
  int64_t chunks = 0;
  const std::vector<MultiTensorEntry> table = entry_table(out, op.name(), chunks);
  if (table.empty()) return;
  void* stream = stream_of(out[0]);
  const Tensor dtable = upload(table, dev, stream, op.name());
  KILN_CUDA_CHECK(launch_multi_tensor_scale(static_cast<const MultiTensorEntry*>(dtable.raw_data()),
                                            static_cast<int>(table.size()), chunks, op.scale(), stream),
                  op.name());
}

}  // namespace

KILN_REGISTER(cuda_optim_kernels) {
  register_kernel<prim::AdamWStep>(DeviceType::cuda, &adamw_kernel);
  register_kernel<prim::MultiTensorL2Norm>(DeviceType::cuda, &l2_norm_kernel);
  register_kernel<prim::MultiTensorScale>(DeviceType::cuda, &scale_kernel);
}

}  // namespace kiln::cuda

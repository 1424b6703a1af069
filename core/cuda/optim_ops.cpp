// Host side of the CUDA optimiser family: prim::AdamWStep builds the per-tensor table (pointers,
// sizes, chunk offsets, bias corrections), uploads it in one copy and runs launch_adamw once.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/cuda/check.h"
#include "core/cuda/optim.cuh"
#include "core/cuda/register.h"
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

}  // namespace

void register_optim_kernels() { register_kernel<prim::AdamWStep>(DeviceType::cuda, &adamw_kernel); }

}  // namespace kiln::cuda

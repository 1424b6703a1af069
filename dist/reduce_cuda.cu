// The local backend's reduce kernel: a grid-stride loop; each thread reads element i of every
// source, then writes it to every destination (so in-place all_reduce is safe).
#include "core/cuda/dtype.cuh"
#include "dist/reduce_cuda.cuh"

namespace kiln::dist {
namespace {

template <class T>
__global__ void reduce_kernel(ReduceBuffers b, int64_t count, bool max) {
  using C = cuda::device_compute_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    C acc = cuda::to_compute(static_cast<const T*>(b.srcs[0])[i]);
    for (int s = 1; s < b.num_srcs; ++s) {
      C v = cuda::to_compute(static_cast<const T*>(b.srcs[s])[i]);
      if (!max) {
        acc += v;
      } else if constexpr (std::is_floating_point_v<C>) {
        if (isnan(v) || (!isnan(acc) && v > acc)) acc = v;
      } else if (v > acc) {
        acc = v;
      }
    }
    const T out = cuda::from_compute<T>(acc);
    for (int d = 0; d < b.num_dsts; ++d) static_cast<T*>(b.dsts[d])[i] = out;
  }
}

template <class T>
cudaError_t launch(const ReduceBuffers& b, int64_t count, bool max, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  reduce_kernel<T><<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), kThreads, 0, stream>>>(b, count, max);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_reduce(DType dtype, bool max, const ReduceBuffers& buffers, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return launch<float>(buffers, count, max, stream);
    case DType::bf16: return launch<__nv_bfloat16>(buffers, count, max, stream);
    case DType::f64: return launch<double>(buffers, count, max, stream);
    case DType::i64: return launch<int64_t>(buffers, count, max, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kiln::dist

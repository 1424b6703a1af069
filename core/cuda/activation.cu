// Kernels and launchers of SwiGLU, forward and backward: 16-byte vector loads over contiguous
// aligned operands, scalar loads otherwise, grid-stride loops.
#include "core/cuda/activation.cuh"
#include "core/cuda/fused_common.cuh"

namespace kiln::cuda {
namespace {

using namespace fused;

template <class C>
__device__ __forceinline__ C sigmoid_of(C a) {
  return C(1) / (C(1) + exp(-a));
}

template <class T, int VEC>
__global__ void swiglu_contiguous(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                  int64_t n) {
  using C = device_compute_t<T>;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    C a[VEC], b[VEC];
    load_vec<VEC>(gate + i * VEC, a);
    load_vec<VEC>(up + i * VEC, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = a[k] * sigmoid_of(a[k]) * b[k];
    store_vec<VEC>(out + i * VEC, a);
  }
  for (int64_t j = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += stride) {
    const C a = to_compute(gate[j]), b = to_compute(up[j]);
    out[j] = from_compute<T>(a * sigmoid_of(a) * b);
  }
}

template <class T>
__global__ void swiglu_strided(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                               Strided<3> st, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[3];
    st.offsets(i, off);
    const auto a = to_compute(gate[off[1]]), b = to_compute(up[off[2]]);
    out[off[0]] = from_compute<T>(a * sigmoid_of(a) * b);
  }
}

template <class C>
__device__ __forceinline__ void swiglu_grad(C a, C b, C g, C& da, C& db) {
  const C sig = sigmoid_of(a);
  da = g * b * sig * (C(1) + a * (C(1) - sig));
  db = g * a * sig;
}

template <class T, int VEC>
__global__ void swiglu_backward_contiguous(const T* __restrict__ gate, const T* __restrict__ up,
                                           const T* __restrict__ g, T* __restrict__ dgate, T* __restrict__ dup,
                                           int64_t n) {
  using C = device_compute_t<T>;
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    C a[VEC], b[VEC], gv[VEC], da[VEC], db[VEC];
    load_vec<VEC>(gate + i * VEC, a);
    load_vec<VEC>(up + i * VEC, b);
    load_vec<VEC>(g + i * VEC, gv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) swiglu_grad(a[k], b[k], gv[k], da[k], db[k]);
    store_vec<VEC>(dgate + i * VEC, da);
    store_vec<VEC>(dup + i * VEC, db);
  }
  for (int64_t j = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += stride) {
    C da, db;
    swiglu_grad<C>(to_compute(gate[j]), to_compute(up[j]), to_compute(g[j]), da, db);
    dgate[j] = from_compute<T>(da);
    dup[j] = from_compute<T>(db);
  }
}

template <class T>
__global__ void swiglu_backward_strided(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ g,
                                        T* __restrict__ dgate, T* __restrict__ dup, Strided<5> st, int64_t n) {
  using C = device_compute_t<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[5];
    st.offsets(i, off);
    C da, db;
    swiglu_grad<C>(to_compute(gate[off[2]]), to_compute(up[off[3]]), to_compute(g[off[4]]), da, db);
    dgate[off[0]] = from_compute<T>(da);
    dup[off[1]] = from_compute<T>(db);
  }
}

}  // namespace

cudaError_t launch_swiglu(DType dt, const void* gate, const void* up, void* out, int64_t n, const Strided<3>* st,
                          void* stream) {
  if (n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = vec_of<T>();
    if (st == nullptr && aligned16(gate) && aligned16(up) && aligned16(out)) {
      swiglu_contiguous<T, V><<<grid_for((n + V - 1) / V, kThreads), kThreads, 0, s>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
    } else if (st == nullptr) {
      swiglu_contiguous<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<const T*>(gate),
                                                                         static_cast<const T*>(up),
                                                                         static_cast<T*>(out), n);
    } else {
      swiglu_strided<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<const T*>(gate),
                                                                   static_cast<const T*>(up), static_cast<T*>(out),
                                                                   *st, n);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_swiglu_backward(DType dt, const void* gate, const void* up, const void* g, void* dgate, void* dup,
                                   int64_t n, const Strided<5>* st, void* stream) {
  if (n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = vec_of<T>();
    if (st == nullptr && aligned16(gate) && aligned16(up) && aligned16(g) && aligned16(dgate) && aligned16(dup)) {
      swiglu_backward_contiguous<T, V><<<grid_for((n + V - 1) / V, kThreads), kThreads, 0, s>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<const T*>(g), static_cast<T*>(dgate),
          static_cast<T*>(dup), n);
    } else if (st == nullptr) {
      swiglu_backward_contiguous<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<const T*>(g), static_cast<T*>(dgate),
          static_cast<T*>(dup), n);
    } else {
      swiglu_backward_strided<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<const T*>(g), static_cast<T*>(dgate),
          static_cast<T*>(dup), *st, n);
    }
    return cudaGetLastError();
  });
}

}  // namespace kiln::cuda

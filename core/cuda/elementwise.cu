// CUDA kernels of the elementwise primitives (unary, binary, where) computing with the functors of
// core/functors.h in device_compute_t<T>. Paths: dense (contiguous or fully broadcast operands, 16-byte
// vector loads/stores, grid-stride), packed strided (broadcast rows such as a bias: 16-byte packs along
// a stride-1 innermost dim) and strided (any layout, one Indexer computation per element).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "core/cuda/dtype.cuh"
#include "core/cuda/elementwise.cuh"
#include "core/cuda/indexer.cuh"
#include "core/cuda/launch.cuh"
#include "core/cuda/pack.cuh"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;

// An operand of the dense path: a contiguous array, or one value broadcast to every element.
template <class T> struct Dense {
  const T* p;
  bool scalar;
};

template <class T, int V> __device__ __forceinline__ Pack<T, V> load_pack(const Dense<T>& in, int64_t i) {
  if (in.scalar) {
    Pack<T, V> r;
    const T s = in.p[0];
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = s;
    return r;
  }
  return reinterpret_cast<const Pack<T, V>*>(in.p)[i];
}

template <class O, int V, class F, class... P>
__device__ __forceinline__ Pack<O, V> apply_pack(const F& f, const P&... in) {
  Pack<O, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = f(in.v[j]...);
  return r;
}

// out (n) = f(in...) with V elements per 16-byte access; the n % V tail element by element.
template <int V, class O, class F, class... Ts>
__global__ void __launch_bounds__(kThreads) dense_kernel(int64_t n, O* __restrict__ out, F f, Dense<Ts>... in) {
  const int64_t nvec = n / V;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = t0; i < nvec; i += step) {
    reinterpret_cast<Pack<O, V>*>(out)[i] = apply_pack<O, V>(f, load_pack<Ts, V>(in, i)...);
  }
  for (int64_t i = nvec * V + t0; i < n; i += step) out[i] = f(in.p[in.scalar ? 0 : i]...);
}

template <class O, class F, int N, class... Ts, size_t... K>
__device__ __forceinline__ void strided_element(const Indexer<N>& ix, int64_t i, O* out, const F& f,
                                                std::index_sequence<K...>, const Ts*... in) {
  int64_t off[N];
  ix.offsets(i, off);
  out[off[0]] = f(in[off[K + 1]]...);
}

// out = f(in...) over any layout: operand k of element i sits at ix.offsets(i)[k].
template <class O, class F, class... Ts>
__global__ void __launch_bounds__(kThreads)
    strided_kernel(int64_t n, Indexer<1 + sizeof...(Ts)> ix, O* __restrict__ out, F f, const Ts*... in) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    strided_element(ix, i, out, f, std::index_sequence_for<Ts...>{}, in...);
  }
}

template <int V, class T> __device__ __forceinline__ Pack<T, V> load_pack_at(const Dense<T>& in, int64_t off) {
  if (in.scalar) {
    Pack<T, V> r;
    const T s = in.p[off];
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = s;
    return r;
  }
  return *reinterpret_cast<const Pack<T, V>*>(in.p + off);
}

template <int V, class O, class F, int N, class... Ts, size_t... K>
__device__ __forceinline__ void strided_pack(const Indexer<N>& ix, int64_t g, O* out, const F& f,
                                             std::index_sequence<K...>, const Dense<Ts>&... in) {
  int64_t off[N];
  ix.offsets(g * V, off);
  *reinterpret_cast<Pack<O, V>*>(out + off[0]) = apply_pack<O, V>(f, load_pack_at<V>(in, off[K + 1])...);
}

// Any layout whose innermost dim has stride 1 (or 0: `scalar` operands, broadcast along it) and a size
// divisible by V: V elements per access, one index computation per pack.
template <int V, class O, class F, class... Ts>
__global__ void __launch_bounds__(kThreads)
    strided_vec_kernel(int64_t groups, Indexer<1 + sizeof...(Ts)> ix, O* __restrict__ out, F f, Dense<Ts>... in) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += step) {
    strided_pack<V>(ix, g, out, f, std::index_sequence_for<Ts...>{}, in...);
  }
}

// ---- functors over storage types

template <class T, UnaryOp OP> struct UnaryFn {
  __device__ __forceinline__ T operator()(T x) const {
    return from_compute<T>(apply_unary<device_compute_t<T>>(OP, to_compute(x)));
  }
};

template <class T, BinaryOp OP> struct BinaryFn {
  using Out = std::conditional_t<binary_is_comparison(OP), bool, T>;
  __device__ __forceinline__ Out operator()(T a, T b) const {
    using C = device_compute_t<T>;
    if constexpr (binary_is_comparison(OP)) {
      return apply_compare<C>(OP, to_compute(a), to_compute(b));
    } else {
      return from_compute<T>(apply_binary<C>(OP, to_compute(a), to_compute(b)));
    }
  }
};

// A pure selection, so it runs on same-size unsigned carriers.
template <class T> struct WhereFn {
  __device__ __forceinline__ T operator()(bool c, T a, T b) const { return c ? a : b; }
};

// ---- launching

template <class O, class... Ts> constexpr int pack_width() {
  constexpr size_t widest = std::max({sizeof(O), sizeof(Ts)...});
  return static_cast<int>(16 / widest);  // elements per 16-byte access of the widest operand
}

template <class O, class F, class... Ts, size_t... K>
void launch_dense(O* out, int64_t n, const F& f, cudaStream_t s, const bool* scalar, std::index_sequence<K...>,
                  const Ts*... in) {
  constexpr int V = pack_width<O, Ts...>();
  dense_kernel<V><<<grid_to_fill((n + V - 1) / V, kThreads), kThreads, 0, s>>>(n, out, f, Dense<Ts>{in, scalar[K + 1]}...);
}

// The packed strided path applies when the innermost dim has stride 1 for the output and 0 or 1 for
// the inputs, its size and every other stride of the stride-1 operands are multiples of V, and those
// operands are 16-byte aligned (so every pack is).
template <int N>
bool packable(const Strided<N>& st, const void* const (&ptrs)[N], int v, bool (&scalar)[N]) {
  if (st.ndim < 1 || st.shape[st.ndim - 1] % v != 0) return false;
  for (int k = 0; k < N; ++k) {
    const int64_t inner = st.strides[k][st.ndim - 1];
    if (inner != 1 && (inner != 0 || k == 0)) return false;
    scalar[k] = inner == 0;
    if (scalar[k]) continue;
    if (!aligned16(ptrs[k])) return false;
    for (int d = 0; d + 1 < st.ndim; ++d) {
      if (st.strides[k][d] % v != 0) return false;
    }
  }
  return true;
}

template <class O, class F, class... Ts, size_t... K>
void launch_strided_vec(O* out, const Strided<1 + sizeof...(Ts)>& st, int64_t n, const F& f, cudaStream_t s,
                        const bool* scalar, std::index_sequence<K...>, const Ts*... in) {
  constexpr int V = pack_width<O, Ts...>();
  const int64_t groups = n / V;
  strided_vec_kernel<V><<<grid_to_fill(groups, kThreads), kThreads, 0, s>>>(groups, Indexer<1 + sizeof...(Ts)>(st, n), out, f,
                                                               Dense<Ts>{in, scalar[K + 1]}...);
}

// Runs f over the operands (out, in...) described by st: the dense path where st is one dim (or none)
// with stride 1 for the output and 0 or 1 for inputs and the arrays are 16-byte aligned, else the
// packed strided path where it applies, else the element-wise strided path.
template <class O, class F, class... Ts>
cudaError_t run(O* out, const Strided<1 + sizeof...(Ts)>& st, int64_t n, const F& f, void* stream, const Ts*... in) {
  if (n == 0) return cudaSuccess;
  constexpr int N = 1 + sizeof...(Ts);
  auto s = static_cast<cudaStream_t>(stream);
  bool dense = st.ndim <= 1 && aligned16(out) && (st.ndim == 0 || st.strides[0][0] == 1);
  bool scalar[N] = {};
  const void* ptrs[N] = {out, in...};
  for (int k = 1; k < N && dense; ++k) {
    const int64_t stride = st.ndim == 0 ? 0 : st.strides[k][0];
    scalar[k] = stride == 0;
    dense = (stride == 0 || stride == 1) && (scalar[k] || aligned16(ptrs[k]));
  }
  if (dense) {
    launch_dense(out, n, f, s, scalar, std::index_sequence_for<Ts...>{}, in...);
  } else if (packable(st, ptrs, pack_width<O, Ts...>(), scalar)) {
    launch_strided_vec(out, st, n, f, s, scalar, std::index_sequence_for<Ts...>{}, in...);
  } else {
    strided_kernel<<<grid_to_fill(n, kThreads), kThreads, 0, s>>>(n, Indexer<N>(st, n), out, f, in...);
  }
  return cudaGetLastError();
}

template <class T> constexpr bool is_float_v =
    std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> ||
    std::is_same_v<T, __half>;

}  // namespace

cudaError_t launch_unary(UnaryOp op, DType dtype, void* out, const void* x, const Strided<2>& st, int64_t n,
                         void* stream) {
  cudaError_t err = cudaErrorNotSupported;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, bool>) {
      visit_enum<UnaryOp, kNumUnaryOps>(op, [&](auto op_c) {
        constexpr UnaryOp OP = decltype(op_c)::value;
        if constexpr (is_float_v<T> || !unary_is_float_only(OP)) {
          err = run(static_cast<T*>(out), st, n, UnaryFn<T, OP>{}, stream, static_cast<const T*>(x));
        }
      });
    }
  });
  return err;
}

cudaError_t launch_binary(BinaryOp op, DType dtype, void* out, const void* a, const void* b, const Strided<3>& st,
                          int64_t n, void* stream) {
  cudaError_t err = cudaErrorNotSupported;
  visit_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    visit_enum<BinaryOp, kNumBinaryOps>(op, [&](auto op_c) {
      constexpr BinaryOp OP = decltype(op_c)::value;
      constexpr bool allowed = std::is_same_v<T, bool> ? (OP == BinaryOp::eq || OP == BinaryOp::ne)
                                                       : (is_float_v<T> || !binary_is_float_only(OP));
      if constexpr (allowed) {
        using O = typename BinaryFn<T, OP>::Out;
        err = run(static_cast<O*>(out), st, n, BinaryFn<T, OP>{}, stream, static_cast<const T*>(a),
                  static_cast<const T*>(b));
      }
    });
  });
  return err;
}

cudaError_t launch_where(DType dtype, void* out, const void* cond, const void* a, const void* b, const Strided<4>& st,
                         int64_t n, void* stream) {
  cudaError_t err = cudaErrorNotSupported;
  auto go = [&](auto tag) {
    using U = typename decltype(tag)::type;
    err = run(static_cast<U*>(out), st, n, WhereFn<U>{}, stream, static_cast<const bool*>(cond),
              static_cast<const U*>(a), static_cast<const U*>(b));
  };
  switch (itemsize(dtype)) {
    case 1: go(type_tag<uint8_t>{}); break;
    case 2: go(type_tag<uint16_t>{}); break;
    case 4: go(type_tag<uint32_t>{}); break;
    case 8: go(type_tag<uint64_t>{}); break;
    default: break;
  }
  return err;
}

}  // namespace kiln::cuda

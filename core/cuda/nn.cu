// Kernels and launchers of embedding (forward, and a deterministic backward through a stable radix
// sort of the ids), rotary embedding and SwiGLU. Memory-bound: 16-byte vector loads wherever rows are
// contiguous and aligned, scalar strided loads otherwise, grid-stride loops. RMSNorm lives in
// nn_norm.cu, cross-entropy in nn_loss.cu; shared helpers in nn_common.cuh.
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <type_traits>

#include "core/cuda/nn.cuh"
#include "core/cuda/nn_common.cuh"

namespace kiln::cuda {
namespace {

using namespace nn_kernels;

// ======================================================================= embedding

template <class T, class I, int VEC>
__global__ void embedding_kernel(const T* __restrict__ w, int64_t ws0, int64_t ws1, const I* __restrict__ ids,
                                 Strided<1> id_pos, int64_t n, int64_t v, int64_t d, T* __restrict__ out,
                                 unsigned long long* err) {
  const int64_t nvec = d / VEC;  // (VEC divides d on the vector path)
  const int64_t total = n * nvec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec, col = (i - row * nvec) * VEC;
    int64_t off[1];
    id_pos.offsets(row, off);
    const int64_t id = static_cast<int64_t>(ids[off[0]]);
    if (id < 0 || id >= v) {
      if (col == 0) record_error(err, row);
      continue;
    }
    if constexpr (VEC > 1) {
      *reinterpret_cast<Pack<T, VEC>*>(out + row * d + col) = *reinterpret_cast<const Pack<T, VEC>*>(w + id * ws0 + col);
    } else {
      out[row * d + col] = w[id * ws0 + col * ws1];
    }
  }
}

// keys = ids as int32 (range-checked), vals = positions, goff = element offset of each grad row.
template <class I>
__global__ void embedding_sort_prep(const I* __restrict__ ids, Strided<1> id_pos, Strided<1> grad_rows, int64_t n,
                                    int64_t v, int32_t* keys, int32_t* vals, int64_t* goff, unsigned long long* err) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[1];
    id_pos.offsets(i, off);
    const int64_t id = static_cast<int64_t>(ids[off[0]]);
    if (id < 0 || id >= v) record_error(err, i);
    keys[i] = static_cast<int32_t>(id < 0 || id >= v ? 0 : id);
    vals[i] = static_cast<int32_t>(i);
    grad_rows.offsets(i, off);
    goff[i] = off[0];
  }
}

// One block per group of equal sorted ids (its first position): sums the group's grad rows in
// position order into out[id]. blockIdx.y splits D.
template <class T, int VEC>
__global__ void embedding_group_sum(const int32_t* __restrict__ keys, const int32_t* __restrict__ pos,
                                    const int64_t* __restrict__ goff, int64_t n, const T* __restrict__ g, int64_t gs,
                                    int64_t d, T* __restrict__ out) {
  using C = device_compute_t<T>;
  const int64_t nvec = d / VEC;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int32_t key = keys[i];
    if (i > 0 && keys[i - 1] == key) continue;  // not the first of its group
    int64_t end = i + 1;
    while (end < n && keys[end] == key) ++end;
    for (int64_t vi = threadIdx.x + static_cast<int64_t>(blockIdx.y) * blockDim.x; vi < nvec;
         vi += static_cast<int64_t>(blockDim.x) * gridDim.y) {
      C acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0;
      for (int64_t p = i; p < end; ++p) {
        const T* row = g + goff[pos[p]];
        C x[VEC];
        if constexpr (VEC > 1) load_vec<VEC>(row + vi * VEC, x);
        else x[0] = to_compute(row[vi * gs]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += x[k];
      }
      store_vec<VEC>(out + static_cast<int64_t>(key) * d + vi * VEC, acc);
    }
  }
}

struct SortSpace {
  int32_t *keys_in, *keys_out, *vals_in, *vals_out;
  int64_t* goff;
  void* temp;
  size_t temp_bytes;
  size_t total;
};

size_t round_up(size_t x) { return (x + 255) / 256 * 256; }

SortSpace sort_space(void* base, int64_t n) {
  SortSpace s{};
  size_t temp_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(n));
  const size_t i32 = round_up(static_cast<size_t>(n) * 4), i64 = round_up(static_cast<size_t>(n) * 8);
  auto* b = static_cast<char*>(base);
  s.keys_in = reinterpret_cast<int32_t*>(b);
  s.keys_out = reinterpret_cast<int32_t*>(b + i32);
  s.vals_in = reinterpret_cast<int32_t*>(b + 2 * i32);
  s.vals_out = reinterpret_cast<int32_t*>(b + 3 * i32);
  s.goff = reinterpret_cast<int64_t*>(b + 4 * i32);
  s.temp = b + 4 * i32 + i64;
  s.temp_bytes = temp_bytes;
  s.total = 4 * i32 + i64 + round_up(temp_bytes);
  return s;
}

// ======================================================================= rotary

// blockDim.x threads walk the vectors of a half row, blockDim.y rows per block (grid-stride over
// rows); row offsets in Idx (32-bit where they fit).
template <class T, class U, int VEC, class Idx>
__global__ void rotary_kernel(const T* __restrict__ x, const U* __restrict__ cos, const U* __restrict__ sin,
                              Strided<3> rows, Idx xs, Idx cs, Idx ss, int64_t r, int64_t h, T* __restrict__ out) {
  using C = device_compute_t<T>;
  const int64_t nvh = h / VEC;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < r;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    Idx off[3];
    offsets_as<Idx>(rows, static_cast<Idx>(row), off);
    const T* xr = x + off[0];
    const U* cr = cos + off[1];
    const U* sr = sin + off[2];
    T* orow = out + row * 2 * h;
    for (int64_t vi = threadIdx.x; vi < nvh; vi += blockDim.x) {
      const Idx e = static_cast<Idx>(vi * VEC);
      C a[VEC], b[VEC], c[VEC], s[VEC], y1[VEC], y2[VEC];
      if constexpr (VEC > 1) {
        load_vec<VEC>(xr + e, a);
        load_vec<VEC>(xr + e + h, b);
        load_vec<VEC>(cr + e, c);
        load_vec<VEC>(sr + e, s);
      } else {
        a[0] = to_compute(xr[e * xs]);
        b[0] = to_compute(xr[(e + static_cast<Idx>(h)) * xs]);
        c[0] = static_cast<C>(to_compute(cr[e * cs]));
        s[0] = static_cast<C>(to_compute(sr[e * ss]));
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        y1[k] = a[k] * c[k] - b[k] * s[k];
        y2[k] = b[k] * c[k] + a[k] * s[k];
      }
      store_vec<VEC>(orow + e, y1);
      store_vec<VEC>(orow + h + e, y2);
    }
  }
}

// ======================================================================= swiglu

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

// ======================================================================= launchers

cudaError_t launch_embedding(DType dt, DType id_dt, const void* weight, int64_t v, int64_t d, int64_t ws0,
                             int64_t ws1, const void* ids, const Strided<1>& id_pos, int64_t n, void* out,
                             unsigned long long* err, void* stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return visit_index(id_dt, [&](auto itag) {
      using I = typename decltype(itag)::type;
      constexpr int V = vec_of<T>();
      const bool vec = ws1 == 1 && d % V == 0 && (ws0 * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                       aligned16(weight) && aligned16(out);
      if (vec) {
        embedding_kernel<T, I, V><<<grid_for(n * (d / V), kThreads), kThreads, 0, s>>>(
            static_cast<const T*>(weight), ws0, ws1, static_cast<const I*>(ids), id_pos, n, v, d,
            static_cast<T*>(out), err);
      } else {
        embedding_kernel<T, I, 1><<<grid_for(n * d, kThreads), kThreads, 0, s>>>(
            static_cast<const T*>(weight), ws0, ws1, static_cast<const I*>(ids), id_pos, n, v, d,
            static_cast<T*>(out), err);
      }
      return cudaGetLastError();
    });
  });
}

size_t embedding_backward_workspace(int64_t n) { return sort_space(nullptr, n).total; }

cudaError_t launch_embedding_backward(DType dt, DType id_dt, const void* grad, const Strided<1>& grad_rows,
                                      int64_t gs, const void* ids, const Strided<1>& id_pos, int64_t n, int64_t v,
                                      int64_t d, void* out, void* workspace, size_t workspace_bytes,
                                      unsigned long long* err, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (v * d > 0) {
    cudaError_t e = cudaMemsetAsync(out, 0, static_cast<size_t>(v * d) * itemsize(dt), s);
    if (e != cudaSuccess) return e;
  }
  if (n == 0 || d == 0) return cudaSuccess;
  SortSpace sp = sort_space(workspace, n);
  if (sp.total > workspace_bytes) return cudaErrorInvalidValue;
  cudaError_t e = visit_index(id_dt, [&](auto itag) {
    using I = typename decltype(itag)::type;
    embedding_sort_prep<I><<<grid_for(n, kThreads), kThreads, 0, s>>>(static_cast<const I*>(ids), id_pos, grad_rows,
                                                                       n, v, sp.keys_in, sp.vals_in, sp.goff, err);
    return cudaGetLastError();
  });
  if (e != cudaSuccess) return e;
  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) < v) ++end_bit;
  size_t temp_bytes = sp.temp_bytes;
  e = cub::DeviceRadixSort::SortPairs(sp.temp, temp_bytes, sp.keys_in, sp.keys_out, sp.vals_in, sp.vals_out,
                                      static_cast<int>(n), 0, end_bit, s);
  if (e != cudaSuccess) return e;
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = vec_of<T>();
    // vector loads need every grad row 16-byte aligned: checked through the row strides
    bool vec = gs == 1 && d % V == 0 && aligned16(grad) && aligned16(out);
    for (int k = 0; k < grad_rows.ndim; ++k) vec = vec && (grad_rows.strides[0][k] * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    const int64_t nvec = vec ? d / V : d;
    const int threads = nvec >= 256 ? 256 : (nvec >= 64 ? 64 : 32);
    const int64_t ysplit = (nvec + threads * 4 - 1) / (threads * 4);  // about 4 vectors per thread
    const dim3 grid(static_cast<unsigned>(n < 65535 * 16 ? n : 65535 * 16), static_cast<unsigned>(ysplit < 65535 ? ysplit : 65535));
    if (vec) {
      embedding_group_sum<T, V><<<grid, threads, 0, s>>>(sp.keys_out, sp.vals_out, sp.goff, n,
                                                         static_cast<const T*>(grad), gs, d, static_cast<T*>(out));
    } else {
      embedding_group_sum<T, 1><<<grid, threads, 0, s>>>(sp.keys_out, sp.vals_out, sp.goff, n,
                                                         static_cast<const T*>(grad), gs, d, static_cast<T*>(out));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_rotary(DType dt, DType table_dt, const void* x, const void* cos, const void* sin,
                          const Strided<3>& rows, int64_t xs, int64_t cs, int64_t ss, int64_t r, int64_t h, void* out,
                          void* stream) {
  if (r == 0 || h == 0) return cudaSuccess;
  auto st = static_cast<cudaStream_t>(stream);
  return visit_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto utag) {
      using U = typename decltype(utag)::type;
      constexpr int V = vec_of<T>();
      const bool vec = xs == 1 && cs == 1 && ss == 1 && h % V == 0 && aligned16(x) && aligned16(cos) &&
                       aligned16(sin) && aligned16(out) && (h * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                       rows_aligned16(rows, 0, sizeof(T)) && rows_aligned16(rows, 1, sizeof(U)) &&
                       rows_aligned16(rows, 2, sizeof(U));
      const int64_t nvh = vec ? h / V : h;
      int tx = 1;
      while (tx < 32 && tx < nvh) tx *= 2;
      const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(kThreads / tx));
      const int grid = grid_for(r, kThreads / tx);
      const bool small = fits_32bit(rows, 2 * h * std::max({xs, cs, ss}), r);
      auto launch = [&](auto vtag, auto itag) {
        constexpr int VV = decltype(vtag)::value;
        using Idx = typename decltype(itag)::type;
        rotary_kernel<T, U, VV, Idx><<<grid, block, 0, st>>>(
            static_cast<const T*>(x), static_cast<const U*>(cos), static_cast<const U*>(sin), rows,
            static_cast<Idx>(xs), static_cast<Idx>(cs), static_cast<Idx>(ss), r, h, static_cast<T*>(out));
      };
      using V8 = std::integral_constant<int, V>;
      using V1 = std::integral_constant<int, 1>;
      if (vec && small) launch(V8{}, type_tag<uint32_t>{});
      else if (vec) launch(V8{}, type_tag<int64_t>{});
      else if (small) launch(V1{}, type_tag<uint32_t>{});
      else launch(V1{}, type_tag<int64_t>{});
      return cudaGetLastError();
    };
    if (table_dt == dt) return run(type_tag<T>{});
    if (table_dt == DType::f32) return run(type_tag<float>{});
    return cudaErrorInvalidValue;
  });
}

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

// Kernels and launchers of embedding: the forward gathers rows (16-byte vector loads where rows are
// contiguous and aligned, grid-stride loops), the backward is deterministic: a stable radix sort of
// (id, position) groups equal ids in index order, then one block per group sums its rows.
#include <cub/device/device_radix_sort.cuh>

#include "core/cuda/fused_common.cuh"
#include "core/cuda/indexing.cuh"

namespace kiln::cuda {
namespace {

using namespace fused;

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

}  // namespace

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

}  // namespace kiln::cuda

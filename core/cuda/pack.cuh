// 16-byte vector access for memory-bound CUDA kernels (fmt-free): Pack<T, V> is V elements loaded or
// stored as one aligned access; load_vec/store_vec move V elements to and from the compute type in
// accesses of at most 16 bytes; load_raw/store_raw move them bit for bit (copies of any dtype);
// aligned16 tells whether a pointer allows a 16-byte access.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "core/cuda/dtype.cuh"

namespace kiln::cuda {

template <class T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements of T per 16-byte access.
template <class T> constexpr int vec_of() { return static_cast<int>(16 / sizeof(T)); }

inline __host__ __device__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Vector vi of a row: VEC consecutive elements (aligned to the vector) when VEC > 1, else element vi
// at `stride`.
template <int VEC, class T>
__device__ __forceinline__ const T* vec_at(const T* base, int64_t vi, int64_t stride) {
  return VEC > 1 ? base + vi * VEC : base + vi * stride;
}

template <int VEC, class T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, class T, class C>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& pk, C (&out)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<C>(to_compute(pk.v[k]));
}

// VEC consecutive elements at p as the compute type, in loads of at most 16 bytes (a bf16 vector
// of 8 read alongside f32 tables takes two f32 loads).
template <int VEC, class T, class C>
__device__ __forceinline__ void load_vec(const T* p, C (&out)[VEC]) {
  constexpr int P = vec_of<T>() < VEC ? vec_of<T>() : VEC;
#pragma unroll
  for (int q = 0; q < VEC; q += P) {
    const Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + q);
#pragma unroll
    for (int k = 0; k < P; ++k) out[q + k] = static_cast<C>(to_compute(pk.v[k]));
  }
}

// VEC compute-type values rounded to T and stored at p, in stores of at most 16 bytes.
template <int VEC, class T, class C>
__device__ __forceinline__ void store_vec(T* p, const C (&in)[VEC]) {
  constexpr int P = vec_of<T>() < VEC ? vec_of<T>() : VEC;
#pragma unroll
  for (int q = 0; q < VEC; q += P) {
    Pack<T, P> pk;
#pragma unroll
    for (int k = 0; k < P; ++k) pk.v[k] = from_compute<T>(in[q + k]);
    *reinterpret_cast<Pack<T, P>*>(p + q) = pk;
  }
}

// The unsigned type of B bytes, for one access of B in {1, 2, 4, 8, 16}.
template <int B> struct raw_of;
template <> struct raw_of<1> { using type = uint8_t; };
template <> struct raw_of<2> { using type = uint16_t; };
template <> struct raw_of<4> { using type = uint32_t; };
template <> struct raw_of<8> { using type = uint2; };
template <> struct raw_of<16> { using type = uint4; };

// V elements of T, bit for bit, in one access at an address aligned to V * sizeof(T) (<= 16 bytes).
template <int V, class T>
__device__ __forceinline__ void load_raw(const T* p, T (&out)[V]) {
  static_assert(V * sizeof(T) <= 16, "one access of at most 16 bytes");
  using R = typename raw_of<static_cast<int>(V * sizeof(T))>::type;
  const R r = *reinterpret_cast<const R*>(p);
  memcpy(static_cast<void*>(out), &r, sizeof(R));
}

template <int V, class T>
__device__ __forceinline__ void store_raw(T* p, const T (&in)[V]) {
  static_assert(V * sizeof(T) <= 16, "one access of at most 16 bytes");
  using R = typename raw_of<static_cast<int>(V * sizeof(T))>::type;
  R r;
  memcpy(&r, static_cast<const void*>(in), sizeof(R));
  *reinterpret_cast<R*>(p) = r;
}

}  // namespace kiln::cuda

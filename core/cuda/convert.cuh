// Device-side element conversion with exactly the semantics of kiln::convert (core/dtype.h), so CUDA
// casts are bit-identical to the CPU's: bool is "!= 0", ints wrap, floats reach ints through double
// (truncating), bf16/f16 round to nearest even from float with the CPU's NaN patterns. fmt-free.
#pragma once
#include <cstdint>
#include <type_traits>

#include "core/cuda/dtype.cuh"

namespace kiln::cuda {

template <class T>
inline constexpr bool is_half_v = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// Exact widening of any element to double (bf16/f16/float are exact in float).
template <class T> __device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return static_cast<double>(__bfloat162float(v));
  else if constexpr (std::is_same_v<T, __half>) return static_cast<double>(__half2float(v));
  else return static_cast<double>(v);
}

// float -> bf16 as kiln::bf16(float): round to nearest even, NaN -> quiet NaN keeping the top bits.
__device__ __forceinline__ __nv_bfloat16 float_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  __nv_bfloat16_raw r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.x = static_cast<unsigned short>((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = static_cast<unsigned short>(u >> 16);
  }
  return __nv_bfloat16(r);
}

// float -> f16 as kiln::f16(float): IEEE round to nearest even, NaN -> sign | 0x7e00.
__device__ __forceinline__ __half float_to_f16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    __half_raw r;
    r.x = static_cast<unsigned short>(((u >> 16) & 0x8000u) | 0x7e00u);
    return __half(r);
  }
  return __float2half_rn(f);
}

// The value of `v` as a To, as kiln::convert<To>(v) computes it on the CPU.
template <class To, class From> __device__ __forceinline__ To cast_value(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<To, bool>) {
    return as_double(v) != 0.0;
  } else if constexpr (is_half_v<To>) {
    const float f = static_cast<float>(as_double(v));  // through double, as the CPU (exact from floats)
    if constexpr (std::is_same_v<To, __nv_bfloat16>) return float_to_bf16(f);
    else return float_to_f16(f);
  } else if constexpr (std::is_integral_v<To> && std::is_integral_v<From>) {
    return static_cast<To>(v);
  } else if constexpr (std::is_same_v<To, uint8_t>) {
    // x86 truncates through a signed register and keeps the low byte; do the same for negatives.
    return static_cast<uint8_t>(static_cast<int64_t>(as_double(v)));
  } else {
    return static_cast<To>(as_double(v));
  }
}

}  // namespace kiln::cuda

// Device element types for kiln dtypes (fmt-free): bf16 -> __nv_bfloat16, f16 -> __half, and
// visit_cuda_dtype, which calls fn(type_tag<T>{}) with the device type of a DType.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/dtype.h"

namespace kiln::cuda {

template <class Fn> decltype(auto) visit_cuda_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::f64: return fn(type_tag<double>{});
    case DType::f32: return fn(type_tag<float>{});
    case DType::bf16: return fn(type_tag<__nv_bfloat16>{});
    case DType::f16: return fn(type_tag<__half>{});
    case DType::i64: return fn(type_tag<int64_t>{});
    case DType::i32: return fn(type_tag<int32_t>{});
    case DType::u8: return fn(type_tag<uint8_t>{});
    case DType::boolean: break;
  }
  return fn(type_tag<bool>{});
}

// Compute type on the device: float for the half types and f32, double for f64, int64 for ints.
template <class T> struct device_compute { using type = float; };
template <> struct device_compute<double> { using type = double; };
template <> struct device_compute<int64_t> { using type = int64_t; };
template <> struct device_compute<int32_t> { using type = int64_t; };
template <> struct device_compute<uint8_t> { using type = int64_t; };
template <> struct device_compute<bool> { using type = int64_t; };
template <class T> using device_compute_t = typename device_compute<T>::type;

template <class T> __device__ __forceinline__ device_compute_t<T> to_compute(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return static_cast<device_compute_t<T>>(v);
}
template <class T, class C> __device__ __forceinline__ T from_compute(C v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, bool>) return v != C(0);
  else return static_cast<T>(v);
}

}  // namespace kiln::cuda

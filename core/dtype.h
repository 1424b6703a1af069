// Element types kiln tensors hold, their sizes and names, the bf16/f16 storage types with float
// conversions (round-to-nearest-even) shared by the CPU backend and CUDA host code, and visitors that
// turn a runtime dtype or enum value into a compile-time one.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace kiln {

enum class DType : uint8_t { f64, f32, bf16, f16, i64, i32, u8, boolean };

size_t itemsize(DType d);
const char* dtype_name(DType d);
bool is_floating(DType d);
// i64 or i32: the dtypes ids and targets may have.
inline bool is_index(DType d) { return d == DType::i64 || d == DType::i32; }
// The dtype float ops compute in: f64 for f64, f32 for the other floats (bf16, f16, f32).
inline DType compute_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }
// Parses "f32", "float32", "bf16", "bfloat16", ... ; throws kiln::Error on an unknown name.
DType parse_dtype(const std::string& s);

// bfloat16: the top 16 bits of an IEEE float.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// IEEE half precision (1-5-10).
struct f16 {
  uint16_t bits = 0;
  f16() = default;
  explicit f16(float f);
  operator float() const;
};

template <class T> struct dtype_of;
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::boolean; };
template <class T> inline constexpr DType dtype_v = dtype_of<T>::value;

template <class T> struct type_tag { using type = T; };

// Calls fn(type_tag<T>{}) with T the C++ type of `d`.
template <class Fn> decltype(auto) visit_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::f64: return fn(type_tag<double>{});
    case DType::f32: return fn(type_tag<float>{});
    case DType::bf16: return fn(type_tag<bf16>{});
    case DType::f16: return fn(type_tag<f16>{});
    case DType::i64: return fn(type_tag<int64_t>{});
    case DType::i32: return fn(type_tag<int32_t>{});
    case DType::u8: return fn(type_tag<uint8_t>{});
    case DType::boolean: break;
  }
  return fn(type_tag<bool>{});
}

// Calls fn(std::integral_constant<E, e>{}) for the value e of an enum E whose N values are 0..N-1,
// so a kernel can be instantiated per value (nothing is called for a value outside that range).
template <class E, int N, class Fn, int I = 0> void visit_enum(E e, Fn&& fn) {
  if constexpr (I < N) {
    if (static_cast<int>(e) == I) {
      fn(std::integral_constant<E, static_cast<E>(I)>{});
    } else {
      visit_enum<E, N, Fn, I + 1>(e, std::forward<Fn>(fn));
    }
  }
}

// Arithmetic type used to compute on T: double for f64, float for the other floats, int64 for ints.
template <class T> struct compute_type { using type = float; };
template <> struct compute_type<double> { using type = double; };
template <> struct compute_type<int64_t> { using type = int64_t; };
template <> struct compute_type<int32_t> { using type = int64_t; };
template <> struct compute_type<uint8_t> { using type = int64_t; };
template <> struct compute_type<bool> { using type = int64_t; };
template <class T> using compute_t = typename compute_type<T>::type;

// Value conversion between element types (bool: nonzero; floats to ints truncate).
template <class To, class From> inline To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<To, bool>) {
    return static_cast<double>(v) != 0.0;
  } else if constexpr (std::is_same_v<To, bf16> || std::is_same_v<To, f16>) {
    return To(static_cast<float>(static_cast<double>(v)));
  } else if constexpr (std::is_integral_v<To> && std::is_integral_v<From>) {
    return static_cast<To>(v);
  } else {
    return static_cast<To>(static_cast<double>(v));
  }
}

}  // namespace kiln

// Philox 4x32-10 counter-based generator and the recipes turning its words into numbers. Host and
// device code share this header, so CPU and CUDA kernels produce the same numbers for one seed.
// Element i of a random op with (seed, offset) reads block counter {i', offset} under key seed:
//   uniform f32/bf16/f16 and dropout: word i%4 of block i/4, top 24/8/11 bits -> [0,1)
//   uniform f64: words 2(i%2), 2(i%2)+1 of block i/2 -> 53 bits -> [0,1)
//   normal: all four words of block i, Box-Muller in double
//   randint: words 2(i%2), 2(i%2)+1 of block i/2 as a 64-bit integer, modulo the range
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define KILN_HD __host__ __device__ __forceinline__
#else
#define KILN_HD inline
#endif

namespace kiln::philox {

struct Block { uint32_t w[4]; };

KILN_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

KILN_HD Block philox4x32(uint64_t counter, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Block{{c0, c1, c2, c3}};
}

// Uniform in [0, 1) with `bits` bits of mantissa (24 for f32, 8 for bf16, 11 for f16), exact in
// the target type so rounding can never produce 1.
KILN_HD float uniform_bits(uint64_t i, uint64_t offset, uint64_t seed, int bits) {
  Block b = philox4x32(i / 4, offset, seed);
  uint32_t w = b.w[i % 4];
  return static_cast<float>(w >> (32 - bits)) * (1.0f / static_cast<float>(1u << bits));
}

KILN_HD double uniform_f64(uint64_t i, uint64_t offset, uint64_t seed) {
  Block b = philox4x32(i / 2, offset, seed);
  uint64_t x = (static_cast<uint64_t>(b.w[2 * (i % 2)]) << 32) | b.w[2 * (i % 2) + 1];
  return static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

KILN_HD uint64_t bits64(uint64_t i, uint64_t offset, uint64_t seed) {
  Block b = philox4x32(i / 2, offset, seed);
  return (static_cast<uint64_t>(b.w[2 * (i % 2)]) << 32) | b.w[2 * (i % 2) + 1];
}

}  // namespace kiln::philox

// Kernel and launcher of the rotary embedding: threads walk the vectors of a half row (16-byte loads
// where x, cos and sin rows are contiguous and aligned), several rows per block, 32-bit row offsets
// where they fit.
#include <algorithm>
#include <type_traits>

#include "core/cuda/fused_common.cuh"
#include "core/cuda/rope.cuh"

namespace kiln::cuda {
namespace {

using namespace fused;

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

}  // namespace

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

}  // namespace kiln::cuda

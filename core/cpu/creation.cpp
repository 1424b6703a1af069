// CPU kernels for arange, the Philox random ops and dropout (recipes in core/philox.h).
#include <cmath>

#include "core/registry.h"
#include "core/cpu/strided.h"
#include "core/dispatch.h"
#include "core/ops/creation.h"
#include "core/philox.h"

namespace kiln::cpu {
namespace {

constexpr int kUniformBits[] = {53, 24, 8, 11};  // f64, f32, bf16, f16 (DType order)

void arange_kernel(const prim::Arange& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  visit_dtype(out[0].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(out[0].raw_data());
    int64_t n = out[0].numel();
    parallel_for(n, 65536, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] = convert<T>(op.start() + static_cast<double>(i) * op.step());
    });
  });
}

void random_kernel(const prim::Random& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const uint64_t seed = op.seed(), offset = op.offset();
  const int64_t n = out[0].numel();
  visit_dtype(out[0].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(out[0].raw_data());
    const int bits = is_floating(out[0].dtype()) ? kUniformBits[static_cast<int>(out[0].dtype())] : 24;
    parallel_for(n, 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const uint64_t u = static_cast<uint64_t>(i);
        switch (op.kind()) {
          case prim::RandomKind::uniform:
            p[i] = convert<T>(bits == 53 ? philox::uniform_f64(u, offset, seed) : philox::uniform_bits(u, offset, seed, bits));
            break;
          case prim::RandomKind::normal: {
            philox::Block blk = philox::philox4x32(u, offset, seed);
            // u1 in (0, 1], u2 in [0, 1), 53 bits each
            double u1 = (static_cast<double>(((static_cast<uint64_t>(blk.w[0]) << 32) | blk.w[1]) >> 11) + 1.0) * 0x1p-53;
            double u2 = static_cast<double>(((static_cast<uint64_t>(blk.w[2]) << 32) | blk.w[3]) >> 11) * 0x1p-53;
            p[i] = convert<T>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
            break;
          }
          case prim::RandomKind::integer: {
            uint64_t range = static_cast<uint64_t>(op.high() - op.low());
            p[i] = convert<T>(op.low() + static_cast<int64_t>(philox::bits64(u, offset, seed) % range));
            break;
          }
          case prim::RandomKind::keep_mask:
            p[i] = convert<T>(philox::uniform_bits(u, offset, seed, 24) >= op.p());
            break;
        }
      }
    });
  });
}

void dropout_kernel(const prim::Dropout& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& x = in[0];
  const double p = op.p();
  visit_dtype(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    T* o = static_cast<T*>(out[0].raw_data());
    const T* xp = static_cast<const T*>(x.raw_data());
    const C scale = p >= 1.0 ? C(0) : static_cast<C>(1.0 / (1.0 - p));
    // o is contiguous: element i of the row-major order sits at o[i]; x may be strided.
    StridedLoop<2> loop(x.shape(), {out[0].strides(), x.strides()});
    loop.run([&](const std::array<int64_t, 2>& off, int64_t cnt, const std::array<int64_t, 2>& inc) {
      for (int64_t k = 0; k < cnt; ++k) {
        int64_t i = off[0] + k * inc[0];
        bool keep = philox::uniform_bits(static_cast<uint64_t>(i), op.offset(), op.seed(), 24) >= p;
        o[i] = keep ? convert<T>(static_cast<C>(xp[off[1] + k * inc[1]]) * scale) : convert<T>(0.0);
      }
    });
  });
}

}  // namespace

KILN_REGISTER(cpu_creation_kernels) {
  register_kernel<prim::Arange>(DeviceType::cpu, &arange_kernel);
  register_kernel<prim::Random>(DeviceType::cpu, &random_kernel);
  register_kernel<prim::Dropout>(DeviceType::cpu, &dropout_kernel);
}

}  // namespace kiln::cpu

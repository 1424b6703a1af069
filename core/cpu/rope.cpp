// CPU kernel of the rotary embedding over any strided x and broadcast cos/sin tables (x's dtype or
// f32); bf16/f16/f32 compute in f32, f64 in f64.
#include "core/cpu/fused_common.h"
#include "core/dispatch.h"
#include "core/ops/rope.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::load;
using fused::store;
using fused::visit_float;

template <class T, class U>
void rotary_impl(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  using C = compute_t<T>;
  const int64_t h = x.size(-1) / 2;
  Shape half = x.shape();  // (..., T, D/2): one item per rotated pair
  half.back() = h;
  const StridedLoop<4> loop(half, {out.strides(), x.strides(), broadcast_strides(cos, half), broadcast_strides(sin, half)});
  const int64_t xh = h * x.strides().back(), oh = h * out.strides().back();  // offset of a pair's second half
  const T* xp = static_cast<const T*>(x.raw_data());
  const U* cp = static_cast<const U*>(cos.raw_data());
  const U* sp = static_cast<const U*>(sin.raw_data());
  T* op = out.data_ptr<T>();
  loop.run([&](const std::array<int64_t, 4>& off, int64_t n, const std::array<int64_t, 4>& st) {
    for (int64_t i = 0; i < n; ++i) {
      const T* xi = xp + off[1] + i * st[1];
      T* oi = op + off[0] + i * st[0];
      const C c = load<C>(cp[off[2] + i * st[2]]), s = load<C>(sp[off[3] + i * st[3]]);
      const C a = load<C>(xi[0]), b = load<C>(xi[xh]);
      oi[0] = store<T>(a * c - b * s);
      oi[oh] = store<T>(b * c + a * s);
    }
  });
}

void rotary_kernel(const prim::RotaryEmbedding&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor &x = in[0], &cos = in[1], &sin = in[2];
  visit_float(x.dtype(), "rotary_embedding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (cos.dtype() == x.dtype()) rotary_impl<T, T>(x, cos, sin, out[0]);
    else rotary_impl<T, float>(x, cos, sin, out[0]);
  });
}

}  // namespace

KILN_REGISTER(cpu_rope_kernels) {
  register_kernel<prim::RotaryEmbedding>(DeviceType::cpu, &rotary_kernel);
}

}  // namespace kiln::cpu

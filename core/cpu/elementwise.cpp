// CPU kernels of the elementwise primitives: Unary, Binary and Where over any strided (broadcast,
// non-contiguous) inputs via StridedLoop, computing in compute_t<T>. The op is made a compile-time
// constant per kernel instance, so the inner loops are plain (and vectorisable where stride 1).
#include <array>
#include <type_traits>
#include <utility>

#include "core/registry.h"
#include "core/cpu/strided.h"
#include "core/dispatch.h"
#include "core/functors.h"
#include "core/ops/elementwise.h"

namespace kiln::cpu {
namespace {

template <class T> constexpr bool is_float_storage =
    std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// Runs `loop` in parallel. StridedLoop parallelises over outer rows only, so a loop that merged into
// one run (contiguous or scalar operands) is split here into chunks across threads.
template <size_t N, class F> void run(const StridedLoop<N>& loop, F&& inner) {
  if (loop.shape.size() != 1) {
    loop.run(inner);
    return;
  }
  std::array<int64_t, N> st;
  for (size_t k = 0; k < N; ++k) st[k] = loop.strides[k][0];
  parallel_for(loop.shape[0], 32768, [&](int64_t begin, int64_t end) {
    std::array<int64_t, N> off;
    for (size_t k = 0; k < N; ++k) off[k] = begin * st[k];
    inner(off, end - begin, st);
  });
}

// ---- Unary: out = f(x)

template <class T, UnaryOp OP> void unary_loop(const Tensor& x, Tensor& out) {
  using C = compute_t<T>;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  StridedLoop<2> loop(out.shape(), {out.strides(), broadcast_strides(x, out.shape())});
  run(loop, [&](const std::array<int64_t, 2>& off, int64_t n, const std::array<int64_t, 2>& st) {
    T* o = op + off[0];  // (n) at stride st[0]
    const T* a = xp + off[1];  // (n) at stride st[1]
    if (st[0] == 1 && st[1] == 1) {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(apply_unary<C>(OP, static_cast<C>(a[j])));
    } else {
      for (int64_t j = 0; j < n; ++j) o[j * st[0]] = static_cast<T>(apply_unary<C>(OP, static_cast<C>(a[j * st[1]])));
    }
  });
}

void unary_kernel(const prim::Unary& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  visit_dtype(in[0].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, bool>) {
      visit_enum<UnaryOp, kNumUnaryOps>(p.op(), [&](auto op_c) {
        constexpr UnaryOp OP = decltype(op_c)::value;
        if constexpr (is_float_storage<T> || !unary_is_float_only(OP)) unary_loop<T, OP>(in[0], out[0]);
      });
    }
  });
}

// ---- Binary: out = a op b (bool out for comparisons)

template <class T, BinaryOp OP> void binary_loop(const Tensor& a, const Tensor& b, Tensor& out) {
  using C = compute_t<T>;
  using O = std::conditional_t<binary_is_comparison(OP), bool, T>;
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  O* op = out.data_ptr<O>();
  auto f = [](T x, T y) -> O {
    if constexpr (binary_is_comparison(OP)) {
      return apply_compare<C>(OP, static_cast<C>(x), static_cast<C>(y));
    } else {
      return static_cast<T>(apply_binary<C>(OP, static_cast<C>(x), static_cast<C>(y)));
    }
  };
  const Shape& s = out.shape();
  StridedLoop<3> loop(s, {out.strides(), broadcast_strides(a, s), broadcast_strides(b, s)});
  run(loop, [&](const std::array<int64_t, 3>& off, int64_t n, const std::array<int64_t, 3>& st) {
    O* o = op + off[0];        // (n) at stride st[0]
    const T* x = ap + off[1];  // (n) at stride st[1], 0 when broadcast
    const T* y = bp + off[2];  // (n) at stride st[2], 0 when broadcast
    if (st[0] == 1 && st[1] == 1 && st[2] == 1) {
      for (int64_t j = 0; j < n; ++j) o[j] = f(x[j], y[j]);
    } else if (st[0] == 1 && st[1] == 1 && st[2] == 0) {
      const T yv = *y;
      for (int64_t j = 0; j < n; ++j) o[j] = f(x[j], yv);
    } else if (st[0] == 1 && st[1] == 0 && st[2] == 1) {
      const T xv = *x;
      for (int64_t j = 0; j < n; ++j) o[j] = f(xv, y[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) o[j * st[0]] = f(x[j * st[1]], y[j * st[2]]);
    }
  });
}

void binary_kernel(const prim::Binary& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  visit_dtype(in[0].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    visit_enum<BinaryOp, kNumBinaryOps>(p.op(), [&](auto op_c) {
      constexpr BinaryOp OP = decltype(op_c)::value;
      constexpr bool allowed = std::is_same_v<T, bool> ? (OP == BinaryOp::eq || OP == BinaryOp::ne)
                                                       : (is_float_storage<T> || !binary_is_float_only(OP));
      if constexpr (allowed) binary_loop<T, OP>(in[0], in[1], out[0]);
    });
  });
}

// ---- Where: out = cond ? a : b (a pure selection, no arithmetic)

void where_kernel(const prim::Where&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  visit_dtype(in[1].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* cp = in[0].data_ptr<bool>();
    const T* ap = in[1].data_ptr<T>();
    const T* bp = in[2].data_ptr<T>();
    T* op = out[0].data_ptr<T>();
    const Shape& s = out[0].shape();
    StridedLoop<4> loop(s, {out[0].strides(), broadcast_strides(in[0], s), broadcast_strides(in[1], s),
                            broadcast_strides(in[2], s)});
    run(loop, [&](const std::array<int64_t, 4>& off, int64_t n, const std::array<int64_t, 4>& st) {
      T* o = op + off[0];           // (n) at stride st[0]
      const bool* c = cp + off[1];  // (n) at stride st[1]
      const T* a = ap + off[2];     // (n) at stride st[2]
      const T* b = bp + off[3];     // (n) at stride st[3]
      for (int64_t j = 0; j < n; ++j) o[j * st[0]] = c[j * st[1]] ? a[j * st[2]] : b[j * st[3]];
    });
  });
}

}  // namespace

KILN_REGISTER(cpu_elementwise_kernels) {
  register_kernel<prim::Unary>(DeviceType::cpu, &unary_kernel);
  register_kernel<prim::Binary>(DeviceType::cpu, &binary_kernel);
  register_kernel<prim::Where>(DeviceType::cpu, &where_kernel);
}

}  // namespace kiln::cpu

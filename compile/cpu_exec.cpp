// The CPU executor of fused groups: an interpreter over the program's instructions that sweeps each
// row of the domain in tiles, each instruction running over a tile through a kernel chosen once per
// group (loads and stores per dtype; unary, binary and cast ops in float or double with the op and the
// rounding fixed at compile time; a generic per-element kernel for the rest). It computes with the same
// functors as the CPU kernels (core/functors.h, core/philox.h) and rounds each result to its dtype as
// eager ops store it. Sums of floats accumulate in double, as core/cpu does. bench/cpu_compile times it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "compile/executor.h"
#include "core/cpu/parallel.h"
#include "core/functors.h"
#include "core/philox.h"

namespace kiln::compile {

Shape slot_strides(const Tensor& t, const Shape& target, Level level) {
  Shape shape = t.shape(), strides = t.strides();
  Shape tgt = target;
  if (level == Level::row) {
    if (!tgt.empty()) tgt.pop_back();
    if (shape.size() == target.size() && !shape.empty() && shape.back() == 1) {
      shape.pop_back();
      strides.pop_back();
    }
  }
  KILN_CHECK(shape.size() <= tgt.size(), "compile", "a group input of shape {} does not broadcast to {}",
             shape_str(t.shape()), shape_str(tgt));
  Shape out(tgt.size(), 0);
  const size_t lead = tgt.size() - shape.size();
  for (size_t i = 0; i < shape.size(); ++i) {
    KILN_CHECK(shape[i] == tgt[lead + i] || shape[i] == 1, "compile", "a group input of shape {} does not broadcast to {}",
               shape_str(t.shape()), shape_str(tgt));
    out[lead + i] = shape[i] == 1 ? 0 : strides[i];
  }
  return out;
}

namespace {

union Scalar {
  double f;
  int64_t i;
};

enum class Kind : uint8_t { f64, f32, i64 };
Kind kind_of(DType d) {
  if (d == DType::f64) return Kind::f64;
  return is_floating(d) ? Kind::f32 : Kind::i64;
}

constexpr int64_t kTile = 256;

// v (in the compute kind of `d`) rounded to what a tensor of dtype d stores.
inline void round_to(DType d, Scalar& v) {
  switch (d) {
    case DType::f32: v.f = static_cast<float>(v.f); break;
    case DType::bf16: v.f = static_cast<float>(bf16(static_cast<float>(v.f))); break;
    case DType::f16: v.f = static_cast<float>(f16(static_cast<float>(v.f))); break;
    case DType::i32: v.i = static_cast<int32_t>(v.i); break;
    case DType::u8: v.i = static_cast<uint8_t>(v.i); break;
    case DType::boolean: v.i = v.i != 0; break;
    default: break;
  }
}

// convert<To>(From) of core/dtype.h on compute-kind values.
inline Scalar convert_scalar(Scalar v, DType from, DType to) {
  const Kind kf = kind_of(from), kt = kind_of(to);
  Scalar r{.i = 0};
  if (to == DType::boolean) {
    r.i = kf == Kind::i64 ? v.i != 0 : v.f != 0.0;
    return r;
  }
  if (kt == Kind::i64) {
    r.i = kf == Kind::i64 ? v.i : static_cast<int64_t>(v.f);
  } else {
    r.f = kf == Kind::i64 ? static_cast<double>(v.i) : v.f;
  }
  round_to(to, r);
  return r;
}

inline Scalar load(const char* base, DType d, int64_t off) {
  Scalar s{.i = 0};
  switch (d) {
    case DType::f64: s.f = reinterpret_cast<const double*>(base)[off]; break;
    case DType::f32: s.f = reinterpret_cast<const float*>(base)[off]; break;
    case DType::bf16: s.f = static_cast<float>(reinterpret_cast<const bf16*>(base)[off]); break;
    case DType::f16: s.f = static_cast<float>(reinterpret_cast<const f16*>(base)[off]); break;
    case DType::i64: s.i = reinterpret_cast<const int64_t*>(base)[off]; break;
    case DType::i32: s.i = reinterpret_cast<const int32_t*>(base)[off]; break;
    case DType::u8: s.i = reinterpret_cast<const uint8_t*>(base)[off]; break;
    case DType::boolean: s.i = reinterpret_cast<const bool*>(base)[off]; break;
  }
  return s;
}

inline void store(char* base, DType d, int64_t off, Scalar s) {
  switch (d) {
    case DType::f64: reinterpret_cast<double*>(base)[off] = s.f; break;
    case DType::f32: reinterpret_cast<float*>(base)[off] = static_cast<float>(s.f); break;
    case DType::bf16: reinterpret_cast<bf16*>(base)[off] = bf16(static_cast<float>(s.f)); break;
    case DType::f16: reinterpret_cast<f16*>(base)[off] = f16(static_cast<float>(s.f)); break;
    case DType::i64: reinterpret_cast<int64_t*>(base)[off] = s.i; break;
    case DType::i32: reinterpret_cast<int32_t*>(base)[off] = static_cast<int32_t>(s.i); break;
    case DType::u8: reinterpret_cast<uint8_t*>(base)[off] = static_cast<uint8_t>(s.i); break;
    case DType::boolean: reinterpret_cast<bool*>(base)[off] = s.i != 0; break;
  }
}

inline Scalar eval_unary(UnaryOp op, DType d, Scalar a) {
  Scalar r{.i = 0};
  switch (kind_of(d)) {
    case Kind::f64: r.f = apply_unary<double>(op, a.f); break;
    case Kind::f32: r.f = apply_unary<float>(op, static_cast<float>(a.f)); break;
    case Kind::i64: r.i = apply_unary<int64_t>(op, a.i); break;
  }
  round_to(d, r);
  return r;
}

// a op b with a, b of dtype `in`; the result has dtype `out` (bool for comparisons).
inline Scalar eval_binary(BinaryOp op, DType in, DType out, Scalar a, Scalar b) {
  Scalar r{.i = 0};
  if (binary_is_comparison(op)) {
    switch (kind_of(in)) {
      case Kind::f64: r.i = apply_compare<double>(op, a.f, b.f); break;
      case Kind::f32: r.i = apply_compare<float>(op, static_cast<float>(a.f), static_cast<float>(b.f)); break;
      case Kind::i64: r.i = apply_compare<int64_t>(op, a.i, b.i); break;
    }
    return r;
  }
  switch (kind_of(in)) {
    case Kind::f64: r.f = apply_binary<double>(op, a.f, b.f); break;
    case Kind::f32: r.f = apply_binary<float>(op, static_cast<float>(a.f), static_cast<float>(b.f)); break;
    case Kind::i64: r.i = apply_binary<int64_t>(op, a.i, b.i); break;
  }
  round_to(out, r);
  return r;
}

// A running reduction: sums in double (floats) or int64, max/min with NaN propagating.
struct Acc {
  Scalar v;
  bool first = true;
};

inline void accumulate(Acc& acc, ReduceOp op, DType d, Scalar x, bool in_type) {
  const Kind k = kind_of(d);
  if (op == ReduceOp::sum || op == ReduceOp::mean) {
    if (acc.first) {
      acc.v = k == Kind::i64 ? Scalar{.i = 0} : Scalar{.f = 0.0};
      acc.first = false;
    }
    if (k == Kind::i64) {
      acc.v.i += x.i;
    } else if (in_type && k == Kind::f32) {
      acc.v.f = static_cast<float>(static_cast<float>(acc.v.f) + static_cast<float>(x.f));
    } else {
      acc.v.f += x.f;
    }
    return;
  }
  if (acc.first) {
    acc.v = x;
    acc.first = false;
    return;
  }
  const BinaryOp bop = op == ReduceOp::max ? BinaryOp::maximum : BinaryOp::minimum;
  if (k == Kind::i64) {
    acc.v.i = apply_binary<int64_t>(bop, acc.v.i, x.i);
  } else {
    acc.v.f = apply_binary<double>(bop, acc.v.f, x.f);
  }
}

inline Scalar finish(Acc& acc, ReduceOp op, DType d, int64_t n) {
  Scalar r = acc.v;
  if (acc.first) r = kind_of(d) == Kind::i64 ? Scalar{.i = 0} : Scalar{.f = 0.0};
  if (op == ReduceOp::mean && kind_of(d) != Kind::i64) r.f = r.f / static_cast<double>(n);
  round_to(d, r);
  return r;
}

struct SlotView {
  const char* base;
  DType dtype;
  Shape strides;  // over S (element) or over the rows (row)
  int64_t last;   // element slots: stride along the last dim
};

// An instruction's operand over one tile: element values (stride 1) or a row value (stride 0).
struct Operand {
  const Scalar* p = nullptr;
  int64_t stride = 0;
  const Scalar& operator[](int64_t e) const { return p[e * stride]; }
};

// One element-level instruction over a tile of n elements. The generic kernels switch per element; the
// specialised ones (float or double compute, the op and the rounding fixed at compile time) are what
// most groups run.
using TileFn = void (*)(const Instr& in, DType a_dtype, Scalar* out, Operand a, Operand b, Operand c, int64_t n);

void unary_generic(const Instr& in, DType, Scalar* out, Operand a, Operand, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = eval_unary(static_cast<UnaryOp>(in.code), in.dtype, a[e]);
}
void binary_generic(const Instr& in, DType a_dtype, Scalar* out, Operand a, Operand b, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = eval_binary(static_cast<BinaryOp>(in.code), a_dtype, in.dtype, a[e], b[e]);
}
void where_tile(const Instr&, DType, Scalar* out, Operand a, Operand b, Operand c, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = a[e].i ? b[e] : c[e];
}
void cast_generic(const Instr& in, DType a_dtype, Scalar* out, Operand a, Operand, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = convert_scalar(a[e], a_dtype, in.dtype);
}

// A float result rounded to what a tensor of floating dtype D (not f64) stores, widened back.
template <DType D>
inline double round_float(float v) {
  if constexpr (D == DType::bf16) return static_cast<float>(bf16(v));
  else if constexpr (D == DType::f16) return static_cast<float>(f16(v));
  else return v;
}

template <UnaryOp Op, DType D>
void unary_float(const Instr&, DType, Scalar* out, Operand a, Operand, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e].f = round_float<D>(apply_unary<float>(Op, static_cast<float>(a[e].f)));
}
template <UnaryOp Op>
void unary_double(const Instr&, DType, Scalar* out, Operand a, Operand, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e].f = apply_unary<double>(Op, a[e].f);
}
template <BinaryOp Op, DType D>
void binary_float(const Instr&, DType, Scalar* out, Operand a, Operand b, Operand, int64_t n) {
  if (a.stride == 1 && b.stride == 1) {
    for (int64_t e = 0; e < n; ++e)
      out[e].f = round_float<D>(apply_binary<float>(Op, static_cast<float>(a.p[e].f), static_cast<float>(b.p[e].f)));
  } else {
    for (int64_t e = 0; e < n; ++e)
      out[e].f = round_float<D>(apply_binary<float>(Op, static_cast<float>(a[e].f), static_cast<float>(b[e].f)));
  }
}
template <BinaryOp Op>
void binary_double(const Instr&, DType, Scalar* out, Operand a, Operand b, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e].f = apply_binary<double>(Op, a[e].f, b[e].f);
}
// A cast between floating dtypes other than f64: the value rounded to the target's precision.
template <DType D>
void cast_float(const Instr&, DType, Scalar* out, Operand a, Operand, Operand, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e].f = round_float<D>(static_cast<float>(a[e].f));
}

// Calls fn(std::integral_constant<DType, D>{}) for a floating dtype D computed in float (f32, bf16, f16);
// false for the others.
template <class Fn>
bool visit_float_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::f32: fn(std::integral_constant<DType, DType::f32>{}); return true;
    case DType::bf16: fn(std::integral_constant<DType, DType::bf16>{}); return true;
    case DType::f16: fn(std::integral_constant<DType, DType::f16>{}); return true;
    default: return false;
  }
}

// The kernel of an element-level unary, binary, where or cast instruction (`a_dtype`: its first
// operand's); null for the others.
TileFn tile_fn(const Instr& in, DType a_dtype) {
  TileFn f = nullptr;
  const bool float_operand = visit_float_dtype(a_dtype, [](auto) {});
  switch (in.op) {
    case Op::unary: {
      const auto op = static_cast<UnaryOp>(in.code);
      visit_float_dtype(in.dtype, [&](auto d) { visit_enum<UnaryOp, kNumUnaryOps>(op, [&](auto o) { f = &unary_float<o.value, d.value>; }); });
      if (in.dtype == DType::f64) visit_enum<UnaryOp, kNumUnaryOps>(op, [&](auto o) { f = &unary_double<o.value>; });
      return f ? f : &unary_generic;
    }
    case Op::binary: {
      const auto op = static_cast<BinaryOp>(in.code);
      if (binary_is_comparison(op)) return &binary_generic;
      if (float_operand)
        visit_float_dtype(in.dtype, [&](auto d) { visit_enum<BinaryOp, kNumBinaryOps>(op, [&](auto o) { f = &binary_float<o.value, d.value>; }); });
      if (in.dtype == DType::f64 && a_dtype == DType::f64)
        visit_enum<BinaryOp, kNumBinaryOps>(op, [&](auto o) { f = &binary_double<o.value>; });
      return f ? f : &binary_generic;
    }
    case Op::where: return &where_tile;
    case Op::cast:
      if (float_operand) visit_float_dtype(in.dtype, [&](auto d) { f = &cast_float<d.value>; });
      return f ? f : &cast_generic;
    default: return nullptr;
  }
}

// Loads n elements of dtype D at base[b + e * step] into compute-kind values.
template <DType D>
void load_tile(const char* base, int64_t b, int64_t step, Scalar* out, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = load(base, D, b + e * step);
}
using LoadFn = void (*)(const char*, int64_t, int64_t, Scalar*, int64_t);
LoadFn load_fn(DType d) {
  return visit_dtype(d, [](auto t) -> LoadFn { return &load_tile<dtype_v<typename decltype(t)::type>>; });
}
// Stores n values as dtype D at base[b + e] (outputs are contiguous).
template <DType D>
void store_tile(char* base, int64_t b, const Scalar* in, int64_t n) {
  for (int64_t e = 0; e < n; ++e) store(base, D, b + e, in[e]);
}
using StoreFn = void (*)(char*, int64_t, const Scalar*, int64_t);
StoreFn store_fn(DType d) {
  return visit_dtype(d, [](auto t) -> StoreFn { return &store_tile<dtype_v<typename decltype(t)::type>>; });
}

// Adds a tile to a running reduction; float sums (in double, or in the result's type) run without the
// per-element switch.
void accumulate_tile(Acc& acc, ReduceOp op, DType d, const Scalar* x, int64_t n, bool in_type) {
  if (n == 0) return;
  if ((op == ReduceOp::sum || op == ReduceOp::mean) && kind_of(d) != Kind::i64) {
    if (acc.first) {
      acc.v.f = 0.0;
      acc.first = false;
    }
    if (in_type && kind_of(d) == Kind::f32) {
      float s = static_cast<float>(acc.v.f);
      for (int64_t e = 0; e < n; ++e) s = s + static_cast<float>(x[e].f);
      acc.v.f = s;
    } else {
      double s = acc.v.f;
      for (int64_t e = 0; e < n; ++e) s += x[e].f;
      acc.v.f = s;
    }
    return;
  }
  if ((op == ReduceOp::max || op == ReduceOp::min) && kind_of(d) != Kind::i64) {
    int64_t e = 0;
    if (acc.first) {
      acc.v = x[e++];
      acc.first = false;
    }
    double m = acc.v.f;
    if (op == ReduceOp::max) {
      for (; e < n; ++e) m = apply_binary<double>(BinaryOp::maximum, m, x[e].f);
    } else {
      for (; e < n; ++e) m = apply_binary<double>(BinaryOp::minimum, m, x[e].f);
    }
    acc.v.f = m;
    return;
  }
  for (int64_t e = 0; e < n; ++e) accumulate(acc, op, d, x[e], in_type);
}

}  // namespace

void run_group_cpu(const Program& p, const GroupArgs& a) {
  const Shape& s = a.domain;
  const int64_t d = s.empty() ? 1 : s.back();
  const Shape rows_shape = s.empty() ? Shape{} : Shape(s.begin(), s.end() - 1);
  const int64_t rows = numel(rows_shape);
  if (rows == 0 || (d == 0 && !p.row)) return;
  std::vector<SlotView> slots;
  for (size_t i = 0; i < p.inputs.size(); ++i) {
    const Tensor& t = a.inputs[i];
    SlotView v{static_cast<const char*>(t.raw_data()), t.dtype(), slot_strides(t, s, p.inputs[i].level), 0};
    if (p.inputs[i].level == Level::element && !s.empty()) {
      v.last = v.strides.back();
      v.strides.pop_back();
    }
    slots.push_back(std::move(v));
  }
  const std::vector<std::vector<bool>> masks = p.pass_masks();
  const size_t ni = p.instrs.size();
  std::vector<int> out_of(ni, -1);  // element outputs by instruction
  for (size_t o = 0; o < p.outputs.size(); ++o)
    if (p.outputs[o].level == Level::element) out_of[static_cast<size_t>(p.outputs[o].instr)] = static_cast<int>(o);
  // Per instruction: its tile kernel, its first operand's dtype, and its load or store kernel.
  std::vector<TileFn> fns(ni, nullptr);
  std::vector<DType> a_dtype(ni, DType::f32);
  std::vector<LoadFn> loads(ni, nullptr);
  std::vector<StoreFn> stores(ni, nullptr);
  for (size_t i = 0; i < ni; ++i) {
    const Instr& in = p.instrs[i];
    if (in.a >= 0) a_dtype[i] = p.instrs[static_cast<size_t>(in.a)].dtype;
    fns[i] = tile_fn(in, a_dtype[i]);
    if (in.op == Op::load) loads[i] = load_fn(in.dtype);
    if (out_of[i] >= 0) stores[i] = store_fn(in.dtype);
  }

  cpu::parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<Scalar> tile(ni * static_cast<size_t>(kTile));
    std::vector<Scalar> row(ni);
    std::vector<Acc> acc(ni);
    std::vector<int64_t> base(slots.size());
    std::vector<int64_t> coord(rows_shape.size());
    for (int64_t r = r0; r < r1; ++r) {
      // row offsets of every slot: r's coordinates in the rows, dotted with the slot's strides
      int64_t rem = r;
      for (size_t k = rows_shape.size(); k-- > 0;) {
        coord[k] = rem % rows_shape[k];
        rem /= rows_shape[k];
      }
      for (size_t k = 0; k < slots.size(); ++k) {
        int64_t off = 0;
        for (size_t j = 0; j < coord.size(); ++j) off += coord[j] * slots[k].strides[j];
        base[k] = off;
      }
      auto eval_row = [&](int stage) {
        for (size_t i = 0; i < ni; ++i) {
          const Instr& in = p.instrs[i];
          if (in.level != Level::row || in.stage != stage || in.op == Op::reduce) continue;
          Scalar& out = row[i];
          switch (in.op) {
            case Op::load: out = load(slots[static_cast<size_t>(in.slot)].base, in.dtype, base[static_cast<size_t>(in.slot)]); break;
            case Op::constant: out = convert_scalar(Scalar{.f = in.value}, DType::f64, in.dtype); break;
            case Op::row_length: out = convert_scalar(Scalar{.i = d}, DType::i64, in.dtype); break;
            case Op::unary: out = eval_unary(static_cast<UnaryOp>(in.code), in.dtype, row[static_cast<size_t>(in.a)]); break;
            case Op::binary:
              out = eval_binary(static_cast<BinaryOp>(in.code), p.instrs[static_cast<size_t>(in.a)].dtype, in.dtype,
                                row[static_cast<size_t>(in.a)], row[static_cast<size_t>(in.b)]);
              break;
            case Op::where: out = row[static_cast<size_t>(in.a)].i ? row[static_cast<size_t>(in.b)] : row[static_cast<size_t>(in.c)]; break;
            case Op::cast: out = convert_scalar(row[static_cast<size_t>(in.a)], p.instrs[static_cast<size_t>(in.a)].dtype, in.dtype); break;
            default: KILN_FAIL("compile", "instruction {} cannot run per row", i);
          }
        }
      };
      for (int pass = 0; pass < p.passes; ++pass) {
        eval_row(pass);
        const std::vector<bool>& mask = masks[static_cast<size_t>(pass)];
        for (size_t i = 0; i < ni; ++i)
          if (p.instrs[i].op == Op::reduce && p.instrs[static_cast<size_t>(p.instrs[i].a)].stage == pass) acc[i] = Acc{};
        for (int64_t j0 = 0; j0 < d; j0 += kTile) {
          const int64_t n = std::min(kTile, d - j0);
          for (size_t i = 0; i < ni; ++i) {
            const Instr& in = p.instrs[i];
            if (in.op == Op::reduce) {
              if (p.instrs[static_cast<size_t>(in.a)].stage != pass) continue;
              accumulate_tile(acc[i], static_cast<ReduceOp>(in.code), in.dtype, &tile[static_cast<size_t>(in.a) * kTile], n,
                              in.value != 0.0);
              continue;
            }
            if (!mask[i]) continue;
            Scalar* out = &tile[i * kTile];
            auto operand = [&](int k) -> Operand {
              if (k < 0) return {};
              if (p.instrs[static_cast<size_t>(k)].level == Level::row) return {&row[static_cast<size_t>(k)], 0};
              return {&tile[static_cast<size_t>(k) * kTile], 1};
            };
            auto opnd = [&](int k, int64_t e) -> Scalar { return operand(k)[e]; };
            switch (in.op) {
              case Op::load: {
                const SlotView& sv = slots[static_cast<size_t>(in.slot)];
                loads[i](sv.base, base[static_cast<size_t>(in.slot)] + j0 * sv.last, sv.last, out, n);
                break;
              }
              case Op::constant: {
                const Scalar c = convert_scalar(Scalar{.f = in.value}, DType::f64, in.dtype);
                std::fill(out, out + n, c);
                break;
              }
              case Op::row_length: {
                const Scalar c = convert_scalar(Scalar{.i = d}, DType::i64, in.dtype);
                std::fill(out, out + n, c);
                break;
              }
              case Op::unary:
              case Op::binary:
              case Op::where:
              case Op::cast: fns[i](in, a_dtype[i], out, operand(in.a), operand(in.b), operand(in.c), n); break;
              case Op::dropout: {
                const auto [seed, offset] = a.rng[static_cast<size_t>(in.slot)];
                const bool dead = in.value >= 1.0;
                const double scale_d = dead ? 0.0 : 1.0 / (1.0 - in.value);
                for (int64_t e = 0; e < n; ++e) {
                  const uint64_t idx = static_cast<uint64_t>(r * d + j0 + e);
                  const bool keep = philox::uniform_bits(idx, offset, seed, 24) >= in.value;
                  Scalar x = opnd(in.a, e), y;
                  if (in.dtype == DType::f64) {
                    y.f = keep ? x.f * scale_d : 0.0;
                  } else {
                    y.f = keep ? static_cast<double>(static_cast<float>(x.f) * static_cast<float>(scale_d)) : 0.0;
                  }
                  round_to(in.dtype, y);
                  out[e] = y;
                }
                break;
              }
              case Op::reduce: break;
            }
            if (out_of[i] >= 0 && in.stage == pass)
              stores[i](static_cast<char*>(a.outputs[static_cast<size_t>(out_of[i])].raw_data()), r * d + j0, out, n);
          }
        }
        for (size_t i = 0; i < ni; ++i) {
          const Instr& in = p.instrs[i];
          if (in.op == Op::reduce && p.instrs[static_cast<size_t>(in.a)].stage == pass)
            row[i] = finish(acc[i], static_cast<ReduceOp>(in.code), in.dtype, d);
        }
      }
      eval_row(p.passes);
      for (size_t o = 0; o < p.outputs.size(); ++o) {
        const Program::Output& out = p.outputs[o];
        if (out.level != Level::row) continue;
        store(static_cast<char*>(a.outputs[o].raw_data()), p.instrs[static_cast<size_t>(out.instr)].dtype, r,
              row[static_cast<size_t>(out.instr)]);
      }
    }
  });
}

}  // namespace kiln::compile

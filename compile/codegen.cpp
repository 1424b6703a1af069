// Generation of CUDA source from a program: one thread per element or per `vec` elements (pointwise,
// grid-stride), or one block per row (row programs: each pass sweeps the row, `vec` elements per
// thread and step, reductions combine across the block with warp shuffles and shared memory). Values are computed in the compute type of their dtype and
// rounded to it, as the CPU interpreter does.
#include "compile/codegen.h"

#include <fmt/format.h>

#include <cstring>

namespace kiln::compile {

uint64_t fnv1a(const std::string& s, uint64_t h) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string Variant::key() const {
  std::string k = fmt::format("r{}i{}d{}b{}v{}:", rank, index32 ? 32 : 64, row_length, block, vec);
  for (Access a : access) k += static_cast<char>('0' + static_cast<int>(a));
  return k;
}

ArgLayout arg_layout(const Program& p, const Variant& v) {
  ArgLayout l;
  auto take = [&](int n) {
    const int at = l.words;
    l.words += n;
    return n > 0 ? at : -1;
  };
  l.count = take(1);
  if (p.row) {
    l.row_length = take(1);
    l.sizes = take(v.rank - 1);
  } else {
    l.sizes = take(v.rank);
  }
  for (size_t k = 0; k < p.inputs.size(); ++k) {
    l.input_ptr.push_back(take(1));
    int n = 0;
    if (p.row) {
      n = p.inputs[k].level == Level::element ? v.rank : v.rank - 1;
    } else if (v.access[k] == Access::strided) {
      n = v.rank;
    }
    l.input_strides.push_back(take(n));
  }
  for (size_t k = 0; k < p.outputs.size(); ++k) l.output_ptr.push_back(take(1));
  for (size_t k = 0; k < p.rng_nodes.size(); ++k) l.rng.push_back(take(2));
  if (l.words == 0) l.words = 1;
  return l;
}

namespace {

// The helpers every kernel may use: dtype conversions (bit-exact with core/dtype.h), typed loads
// and stores returning compute types, rounding to a stored dtype, block reductions.
const char* kPrelude = R"(
typedef long long kiln_i64;
__device__ __forceinline__ float kiln_bf2f(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short kiln_f2bf(float f) {
#if __CUDA_ARCH__ >= 800
  unsigned short h;  // one instruction, as eager's __float2bfloat16_rn
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
#endif
}
__device__ __forceinline__ float kiln_h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short kiln_f2h(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float kiln_rbf16(float f) { return kiln_bf2f(kiln_f2bf(f)); }
__device__ __forceinline__ float kiln_rf16(float f) { return kiln_h2f(kiln_f2h(f)); }
__device__ __forceinline__ double kiln_ld_f64(const void* p, kiln_i64 o) { return ((const double*)p)[o]; }
__device__ __forceinline__ float kiln_ld_f32(const void* p, kiln_i64 o) { return ((const float*)p)[o]; }
__device__ __forceinline__ float kiln_ld_bf16(const void* p, kiln_i64 o) { return kiln_bf2f(((const unsigned short*)p)[o]); }
__device__ __forceinline__ float kiln_ld_f16(const void* p, kiln_i64 o) { return kiln_h2f(((const unsigned short*)p)[o]); }
__device__ __forceinline__ kiln_i64 kiln_ld_i64(const void* p, kiln_i64 o) { return ((const kiln_i64*)p)[o]; }
__device__ __forceinline__ kiln_i64 kiln_ld_i32(const void* p, kiln_i64 o) { return ((const int*)p)[o]; }
__device__ __forceinline__ kiln_i64 kiln_ld_u8(const void* p, kiln_i64 o) { return ((const unsigned char*)p)[o]; }
__device__ __forceinline__ kiln_i64 kiln_ld_bool(const void* p, kiln_i64 o) { return ((const unsigned char*)p)[o] != 0; }
__device__ __forceinline__ void kiln_st_f64(void* p, kiln_i64 o, double v) { ((double*)p)[o] = v; }
__device__ __forceinline__ void kiln_st_f32(void* p, kiln_i64 o, float v) { ((float*)p)[o] = v; }
__device__ __forceinline__ void kiln_st_bf16(void* p, kiln_i64 o, float v) { ((unsigned short*)p)[o] = kiln_f2bf(v); }
__device__ __forceinline__ void kiln_st_f16(void* p, kiln_i64 o, float v) { ((unsigned short*)p)[o] = kiln_f2h(v); }
__device__ __forceinline__ void kiln_st_i64(void* p, kiln_i64 o, kiln_i64 v) { ((kiln_i64*)p)[o] = v; }
__device__ __forceinline__ void kiln_st_i32(void* p, kiln_i64 o, kiln_i64 v) { ((int*)p)[o] = (int)v; }
__device__ __forceinline__ void kiln_st_u8(void* p, kiln_i64 o, kiln_i64 v) { ((unsigned char*)p)[o] = (unsigned char)v; }
__device__ __forceinline__ void kiln_st_bool(void* p, kiln_i64 o, kiln_i64 v) { ((unsigned char*)p)[o] = v != 0; }
// Vector access: V consecutive elements of raw type T at element i0, one aligned load or store.
template <class T, int V> struct alignas(sizeof(T) * V) KilnPack { T x[V]; };
template <class T, int V> __device__ __forceinline__ void kiln_ldv(const void* p, kiln_i64 i0, T (&out)[V]) {
  const KilnPack<T, V> v = *reinterpret_cast<const KilnPack<T, V>*>(static_cast<const T*>(p) + i0);
#pragma unroll
  for (int u = 0; u < V; ++u) out[u] = v.x[u];
}
template <class T, int V> __device__ __forceinline__ void kiln_stv(void* p, kiln_i64 i0, const T (&in)[V]) {
  KilnPack<T, V> v;
#pragma unroll
  for (int u = 0; u < V; ++u) v.x[u] = in[u];
  *reinterpret_cast<KilnPack<T, V>*>(static_cast<T*>(p) + i0) = v;
}
template <class T> struct KilnSum { __device__ __forceinline__ T operator()(T a, T b) const { return a + b; } };
template <class T> struct KilnMax {
  __device__ __forceinline__ T operator()(T a, T b) const { return kiln::apply_binary<T>(kiln::BinaryOp::maximum, a, b); }
};
template <class T> struct KilnMin {
  __device__ __forceinline__ T operator()(T a, T b) const { return kiln::apply_binary<T>(kiln::BinaryOp::minimum, a, b); }
};
// Combines v across the block (blockDim.x a multiple of 32); every thread gets the result.
template <class T, class F> __device__ __forceinline__ T kiln_block_reduce(T v, F f, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v = f(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[w] = v;
  __syncthreads();
  T r = smem[0];
  for (int k = 1; k < nw; ++k) r = f(r, smem[k]);
  return r;
}
)";

// How a tensor of dtype d stores an element, and the conversions between that and its compute type
// (the same as kiln_ld_* / kiln_st_*).
const char* raw_type(DType d) {
  switch (d) {
    case DType::f64: return "double";
    case DType::f32: return "float";
    case DType::bf16:
    case DType::f16: return "unsigned short";
    case DType::i64: return "kiln_i64";
    case DType::i32: return "int";
    case DType::u8:
    case DType::boolean: return "unsigned char";
  }
  return "float";
}
std::string from_raw(DType d, const std::string& x) {
  switch (d) {
    case DType::bf16: return fmt::format("kiln_bf2f({})", x);
    case DType::f16: return fmt::format("kiln_h2f({})", x);
    case DType::i32:
    case DType::u8: return fmt::format("(kiln_i64)({})", x);
    case DType::boolean: return fmt::format("(kiln_i64)(({}) != 0)", x);
    default: return x;
  }
}
std::string to_raw(DType d, const std::string& v) {
  switch (d) {
    case DType::bf16: return fmt::format("kiln_f2bf({})", v);
    case DType::f16: return fmt::format("kiln_f2h({})", v);
    case DType::i32: return fmt::format("(int)({})", v);
    case DType::u8: return fmt::format("(unsigned char)({})", v);
    case DType::boolean: return fmt::format("(unsigned char)(({}) != 0)", v);
    default: return v;
  }
}

const char* ctype(DType d) {
  if (d == DType::f64) return "double";
  return is_floating(d) ? "float" : "kiln_i64";
}

// `e` (of d's compute type) rounded to what a tensor of dtype d stores.
std::string rounded(DType d, const std::string& e) {
  switch (d) {
    case DType::bf16: return fmt::format("kiln_rbf16({})", e);
    case DType::f16: return fmt::format("kiln_rf16({})", e);
    case DType::i32: return fmt::format("(kiln_i64)(int)({})", e);
    case DType::u8: return fmt::format("(kiln_i64)(unsigned char)({})", e);
    case DType::boolean: return fmt::format("(kiln_i64)(({}) != 0)", e);
    default: return e;
  }
}

std::string float_literal(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return fmt::format("__int_as_float(0x{:08x})", u);
}
std::string double_literal(double f) {
  uint64_t u;
  std::memcpy(&u, &f, 8);
  return fmt::format("__longlong_as_double(0x{:016x}LL)", u);
}

// A constant as dtype d stores it, written in d's compute type.
std::string literal(double v, DType d) {
  switch (d) {
    case DType::f64: return double_literal(v);
    case DType::f32: return float_literal(static_cast<float>(v));
    case DType::bf16: return float_literal(static_cast<float>(bf16(static_cast<float>(v))));
    case DType::f16: return float_literal(static_cast<float>(f16(static_cast<float>(v))));
    case DType::i64: return fmt::format("(kiln_i64){}LL", static_cast<int64_t>(v));
    case DType::i32: return fmt::format("(kiln_i64){}LL", static_cast<int32_t>(static_cast<int64_t>(v)));
    case DType::u8: return fmt::format("(kiln_i64){}LL", static_cast<uint8_t>(static_cast<int64_t>(v)));
    case DType::boolean: return v != 0.0 ? "(kiln_i64)1" : "(kiln_i64)0";
  }
  return "0";
}

// convert<To>(From) of core/dtype.h on compute-type values.
std::string converted(const std::string& e, DType from, DType to) {
  if (from == to) return e;
  const bool fi = !is_floating(from);
  if (to == DType::boolean) return fmt::format("(kiln_i64)(({}) != 0)", e);
  if (!is_floating(to)) {
    static const char* const casts[] = {"", "", "", "", "(kiln_i64)", "(int)", "(unsigned char)", ""};
    const char* c = casts[static_cast<int>(to)];
    return fi ? fmt::format("(kiln_i64){}({})", c, e) : fmt::format("(kiln_i64){}(double)({})", c, e);
  }
  if (to == DType::f64) return fmt::format("(double)({})", e);
  return rounded(to, fmt::format("(float)(double)({})", e));
}

class Emitter {
 public:
  Emitter(const Program& p, const Variant& v) : p_(p), v_(v), l_(arg_layout(p, v)) {}

  std::string run() {
    bool dropout = false;
    for (const Instr& in : p_.instrs) dropout = dropout || in.op == Op::dropout;
    out_ = "// kiln compile: a fused group (generated)\n#include \"core/functors.h\"\n";
    if (dropout) out_ += "#include \"core/philox.h\"\n";
    out_ += kPrelude;
    out_ += fmt::format("struct KilnArgs {{ kiln_i64 v[{}]; }};\n", l_.words);
    out_ += fmt::format("extern \"C\" __global__ void __launch_bounds__({}) kiln_fused(KilnArgs a) {{\n", v_.block);
    out_ += fmt::format("  typedef {} I;\n", v_.index32 ? "unsigned int" : "long long");
    for (size_t k = 0; k < p_.inputs.size(); ++k) line(1, "const void* p{} = (const void*)a.v[{}];", k, l_.input_ptr[k]);
    for (size_t k = 0; k < p_.outputs.size(); ++k) line(1, "void* o{} = (void*)a.v[{}];", k, l_.output_ptr[k]);
    for (size_t k = 0; k < p_.rng_nodes.size(); ++k)
      line(1, "const unsigned long long seed{0} = (unsigned long long)a.v[{1}], offs{0} = (unsigned long long)a.v[{2}];", k,
           l_.rng[k], l_.rng[k] + 1);
    if (p_.row) {
      row_kernel();
    } else {
      pointwise_kernel();
    }
    out_ += "}\n";
    return out_;
  }

 private:
  template <class... A>
  void line(int indent, fmt::format_string<A...> f, A&&... args) {
    out_ += std::string(static_cast<size_t>(indent) * 2, ' ');
    out_ += fmt::format(f, std::forward<A>(args)...);
    out_ += '\n';
  }
  std::string reg(int i) const { return fmt::format("r{}", i); }
  const Instr& at(int i) const { return p_.instrs[static_cast<size_t>(i)]; }

  // The right-hand side of instruction i; `off` gives a slot's offset, `lin` the element's index in S.
  std::string expr(int i, const std::function<std::string(int)>& off, const std::string& lin) const {
    const Instr& in = at(i);
    const char* t = ctype(in.dtype);
    switch (in.op) {
      case Op::load:
        if (vector_loop_ && vector_slot(in.slot)) return from_raw(in.dtype, fmt::format("in{}[u]", in.slot));
        return fmt::format("kiln_ld_{}(p{}, {})", dtype_name(in.dtype), in.slot, off(in.slot));
      case Op::constant: return literal(in.value, in.dtype);
      case Op::row_length: return converted("(kiln_i64)D", DType::i64, in.dtype);
      case Op::unary:
        return rounded(in.dtype, fmt::format("kiln::apply_unary<{}>(kiln::UnaryOp::{}, {})", t,
                                             unary_op_name(static_cast<UnaryOp>(in.code)), reg(in.a)));
      case Op::binary: {
        const auto op = static_cast<BinaryOp>(in.code);
        const char* ot = ctype(at(in.a).dtype);
        if (binary_is_comparison(op))
          return fmt::format("(kiln_i64)kiln::apply_compare<{}>(kiln::BinaryOp::{}, {}, {})", ot, binary_op_name(op),
                             reg(in.a), reg(in.b));
        return rounded(in.dtype, fmt::format("kiln::apply_binary<{}>(kiln::BinaryOp::{}, {}, {})", t, binary_op_name(op),
                                             reg(in.a), reg(in.b)));
      }
      case Op::where: return fmt::format("{} ? {} : {}", reg(in.a), reg(in.b), reg(in.c));
      case Op::cast: return converted(reg(in.a), at(in.a).dtype, in.dtype);
      case Op::dropout: {
        const bool f64 = in.dtype == DType::f64;
        const double scale = in.value >= 1.0 ? 0.0 : 1.0 / (1.0 - in.value);
        const std::string s = f64 ? double_literal(scale) : float_literal(static_cast<float>(scale));
        return fmt::format("(double)kiln::philox::uniform_bits((unsigned long long)({}), offs{}, seed{}, 24) >= {} ? {} : ({})0",
                           lin, in.slot, in.slot, double_literal(in.value), rounded(in.dtype, fmt::format("{} * {}", reg(in.a), s)), t);
      }
      case Op::reduce: break;
    }
    return "0";
  }

  bool vector_slot(int slot) const {
    return v_.vec > 1 && static_cast<size_t>(slot) < v_.access.size() && v_.access[static_cast<size_t>(slot)] == Access::contiguous;
  }
  // The dtype each input slot is loaded as (from its load instructions).
  DType slot_dtype(int slot) const {
    for (const Instr& in : p_.instrs)
      if (in.op == Op::load && in.slot == slot) return in.dtype;
    return DType::f32;
  }
  // Vector loads of the contiguous slots `used` reads, at element `base` + their row base.
  void vector_loads(int indent, const std::vector<bool>& used, const std::function<std::string(int)>& at_elem) {
    for (size_t k = 0; k < p_.inputs.size(); ++k) {
      if (!used[k] || !vector_slot(static_cast<int>(k))) continue;
      line(indent, "{} in{}[{}];", raw_type(slot_dtype(static_cast<int>(k))), k, v_.vec);
      line(indent, "kiln_ldv(p{0}, {1}, in{0});", k, at_elem(static_cast<int>(k)));
    }
  }

  // vec elements per thread: vector loads of the contiguous inputs, the instructions unrolled per
  // element, vector stores of the outputs (which are contiguous).
  void pointwise_vector_kernel() {
    const int n_vec = v_.vec;
    line(1, "const I n = (I)a.v[{}];", l_.count);
    line(1, "for (I iv = (I)blockIdx.x * blockDim.x + threadIdx.x; iv < n / {0}; iv += (I)gridDim.x * blockDim.x) {{", n_vec);
    line(2, "const I i0 = iv * {};", n_vec);
    vector_loads(2, std::vector<bool>(p_.inputs.size(), true), [](int) { return std::string("i0"); });
    for (size_t k = 0; k < p_.outputs.size(); ++k)
      line(2, "{} out{}[{}];", raw_type(at(p_.outputs[k].instr).dtype), k, n_vec);
    line(2, "#pragma unroll");
    line(2, "for (int u = 0; u < {}; ++u) {{", n_vec);
    line(3, "const I i = i0 + u;");
    auto off = [](int) { return std::string("0"); };  // scalar slots; contiguous ones come from in<k>[u]
    vector_loop_ = true;
    for (size_t i = 0; i < p_.instrs.size(); ++i)
      line(3, "const {} r{} = {};", ctype(at(static_cast<int>(i)).dtype), i, expr(static_cast<int>(i), off, "i"));
    vector_loop_ = false;
    for (size_t k = 0; k < p_.outputs.size(); ++k) {
      const int r = p_.outputs[k].instr;
      line(3, "out{}[u] = {};", k, to_raw(at(r).dtype, reg(r)));
    }
    line(2, "}}");
    for (size_t k = 0; k < p_.outputs.size(); ++k) line(2, "kiln_stv(o{0}, i0, out{0});", k);
    line(1, "}}");
  }

  void pointwise_kernel() {
    if (v_.vec > 1) return pointwise_vector_kernel();
    const int rank = v_.rank;
    bool strided = false;
    for (Access a : v_.access) strided = strided || a == Access::strided;
    line(1, "const I n = (I)a.v[{}];", l_.count);
    if (strided)
      for (int d = 0; d < rank; ++d) line(1, "const I s{} = (I)a.v[{}];", d, l_.sizes + d);
    for (size_t k = 0; k < p_.inputs.size(); ++k)
      if (v_.access[k] == Access::strided)
        for (int d = 0; d < rank; ++d) line(1, "const I st{}_{} = (I)a.v[{}];", k, d, l_.input_strides[k] + d);
    line(1, "for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)gridDim.x * blockDim.x) {{");
    if (strided) {
      line(2, "I rem = i;");
      for (int d = rank - 1; d >= 1; --d) line(2, "const I c{0} = rem % s{0}; rem /= s{0};", d);
      if (rank > 0) line(2, "const I c0 = rem;");
    }
    for (size_t k = 0; k < p_.inputs.size(); ++k) {
      std::string off = "i";
      if (v_.access[k] == Access::scalar) off = "0";
      if (v_.access[k] == Access::strided) {
        off.clear();
        for (int d = 0; d < rank; ++d) off += fmt::format("{}c{} * st{}_{}", d ? " + " : "", d, k, d);
        if (off.empty()) off = "0";
      }
      line(2, "const I x{} = {};", k, off);
    }
    auto off = [](int slot) { return fmt::format("x{}", slot); };
    for (size_t i = 0; i < p_.instrs.size(); ++i)
      line(2, "const {} r{} = {};", ctype(at(static_cast<int>(i)).dtype), i, expr(static_cast<int>(i), off, "i"));
    for (size_t k = 0; k < p_.outputs.size(); ++k)
      line(2, "kiln_st_{}(o{}, i, r{});", dtype_name(at(p_.outputs[k].instr).dtype), k, p_.outputs[k].instr);
    line(1, "}}");
  }

  // The accumulator type of reduction i, its identity and combining functor.
  std::string acc_type(const Instr& in) const {
    const auto op = static_cast<ReduceOp>(in.code);
    if ((op == ReduceOp::sum || op == ReduceOp::mean) && is_floating(in.dtype) && in.value == 0.0) return "double";
    return ctype(in.dtype);
  }
  std::string identity(const Instr& in) const {
    const auto op = static_cast<ReduceOp>(in.code);
    const std::string t = acc_type(in);
    if (op == ReduceOp::sum || op == ReduceOp::mean) return fmt::format("({})0", t);
    const bool mx = op == ReduceOp::max;
    if (t == "double") return (mx ? "-" : "") + double_literal(std::numeric_limits<double>::infinity());
    if (t == "float") return (mx ? "-" : "") + float_literal(std::numeric_limits<float>::infinity());
    return mx ? "(kiln_i64)(-9223372036854775807LL - 1)" : "(kiln_i64)9223372036854775807LL";
  }
  std::string combiner(const Instr& in) const {
    const auto op = static_cast<ReduceOp>(in.code);
    const char* f = op == ReduceOp::max ? "KilnMax" : op == ReduceOp::min ? "KilnMin" : "KilnSum";
    return fmt::format("{}<{}>()", f, acc_type(in));
  }
  static std::string smem(const std::string& t) {
    return t == "double" ? "kiln_smem_d" : t == "float" ? "kiln_smem_f" : "kiln_smem_i";
  }

  void row_instrs(int stage, int indent) {
    auto off = [](int slot) { return fmt::format("rb{}", slot); };
    for (size_t i = 0; i < p_.instrs.size(); ++i) {
      const Instr& in = at(static_cast<int>(i));
      if (in.level == Level::row && in.stage == stage && in.op != Op::reduce)
        line(indent, "r{} = {};", i, expr(static_cast<int>(i), off, "r"));
    }
  }

  void row_kernel() {
    const int rank = v_.rank;
    line(1, "const I rows = (I)a.v[{}];", l_.count);
    if (v_.row_length >= 0) {
      line(1, "const I D = (I){};", v_.row_length);
    } else {
      line(1, "const I D = (I)a.v[{}];", l_.row_length);
    }
    for (int d = 0; d < rank - 1; ++d) line(1, "const I s{} = (I)a.v[{}];", d, l_.sizes + d);
    for (size_t k = 0; k < p_.inputs.size(); ++k) {
      const int n = p_.inputs[k].level == Level::element ? rank : rank - 1;
      for (int d = 0; d < n; ++d) line(1, "const I st{}_{} = (I)a.v[{}];", k, d, l_.input_strides[k] + d);
    }
    line(1, "__shared__ double kiln_smem_d[32];");
    line(1, "__shared__ float kiln_smem_f[32];");
    line(1, "__shared__ kiln_i64 kiln_smem_i[32];");
    line(1, "for (I r = blockIdx.x; r < rows; r += gridDim.x) {{");
    if (rank > 1) {
      line(2, "I rem = r;");
      for (int d = rank - 2; d >= 1; --d) line(2, "const I c{0} = rem % s{0}; rem /= s{0};", d);
      line(2, "const I c0 = rem;");
    }
    for (size_t k = 0; k < p_.inputs.size(); ++k) {
      std::string b;
      for (int d = 0; d < rank - 1; ++d) b += fmt::format("{}c{} * st{}_{}", d ? " + " : "", d, k, d);
      line(2, "const I rb{} = {};", k, b.empty() ? "0" : b);
    }
    for (size_t i = 0; i < p_.instrs.size(); ++i)
      if (at(static_cast<int>(i)).level == Level::row) line(2, "{} r{};", ctype(at(static_cast<int>(i)).dtype), i);
    const std::vector<std::vector<bool>> masks = p_.pass_masks();
    std::vector<int> element_output(p_.instrs.size(), -1);
    for (size_t k = 0; k < p_.outputs.size(); ++k)
      if (p_.outputs[k].level == Level::element) element_output[static_cast<size_t>(p_.outputs[k].instr)] = static_cast<int>(k);
    auto eoff = [&](int slot) { return fmt::format("rb{0} + j * st{0}_{1}", slot, rank - 1); };
    for (int pass = 0; pass < p_.passes; ++pass) {
      row_instrs(pass, 2);
      std::vector<int> reds;
      for (size_t i = 0; i < p_.instrs.size(); ++i) {
        const Instr& in = at(static_cast<int>(i));
        if (in.op == Op::reduce && at(in.a).stage == pass) reds.push_back(static_cast<int>(i));
      }
      for (int i : reds) line(2, "{} acc{} = {};", acc_type(at(i)), i, identity(at(i)));
      const int nv = v_.vec;
      int body = 3;
      std::vector<int> stored;  // element outputs written in this pass (by output index)
      for (size_t i = 0; i < p_.instrs.size(); ++i)
        if (masks[static_cast<size_t>(pass)][i] && element_output[i] >= 0 && at(static_cast<int>(i)).stage == pass)
          stored.push_back(element_output[i]);
      if (nv > 1) {
        std::vector<bool> used(p_.inputs.size(), false);
        for (size_t i = 0; i < p_.instrs.size(); ++i)
          if (masks[static_cast<size_t>(pass)][i] && at(static_cast<int>(i)).op == Op::load)
            used[static_cast<size_t>(at(static_cast<int>(i)).slot)] = true;
        line(2, "for (I jv = threadIdx.x; jv < D / {0}; jv += blockDim.x) {{", nv);
        line(3, "const I j0 = jv * {};", nv);
        vector_loads(3, used, [](int slot) { return fmt::format("rb{} + j0", slot); });
        for (int k : stored) line(3, "{} out{}[{}];", raw_type(at(p_.outputs[static_cast<size_t>(k)].instr).dtype), k, nv);
        line(3, "#pragma unroll");
        line(3, "for (int u = 0; u < {}; ++u) {{", nv);
        line(4, "const I j = j0 + u;");
        body = 4;
        vector_loop_ = true;
      } else {
        line(2, "for (I j = threadIdx.x; j < D; j += blockDim.x) {{");
      }
      for (size_t i = 0; i < p_.instrs.size(); ++i) {
        if (!masks[static_cast<size_t>(pass)][i]) continue;
        const Instr& in = at(static_cast<int>(i));
        line(body, "const {} r{} = {};", ctype(in.dtype), i, expr(static_cast<int>(i), eoff, "r * D + j"));
        if (element_output[i] >= 0 && in.stage == pass) {
          if (nv > 1) line(body, "out{}[u] = {};", element_output[i], to_raw(in.dtype, reg(static_cast<int>(i))));
          else line(body, "kiln_st_{}(o{}, r * D + j, r{});", dtype_name(in.dtype), element_output[i], i);
        }
      }
      for (int i : reds) {
        const Instr& in = at(i);
        line(body, "acc{0} = {1}(acc{0}, ({2})r{3});", i, combiner(in), acc_type(in), in.a);
      }
      vector_loop_ = false;
      if (nv > 1) {
        line(3, "}}");
        for (int k : stored) line(3, "kiln_stv(o{0}, r * D + j0, out{0});", k);
      }
      line(2, "}}");
      for (int i : reds) {
        const Instr& in = at(i);
        const std::string t = acc_type(in);
        std::string total = fmt::format("kiln_block_reduce(acc{}, {}, {})", i, combiner(in), smem(t));
        if (static_cast<ReduceOp>(in.code) == ReduceOp::mean) total = fmt::format("({}) / ({})D", total, t);
        line(2, "r{} = {};", i, rounded(in.dtype, fmt::format("({})({})", ctype(in.dtype), total)));
      }
    }
    row_instrs(p_.passes, 2);
    line(2, "if (threadIdx.x == 0) {{");
    for (size_t k = 0; k < p_.outputs.size(); ++k)
      if (p_.outputs[k].level == Level::row)
        line(3, "kiln_st_{}(o{}, r, r{});", dtype_name(at(p_.outputs[k].instr).dtype), k, p_.outputs[k].instr);
    line(2, "}}");
    line(1, "}}");
  }

  const Program& p_;
  const Variant& v_;
  ArgLayout l_;
  std::string out_;
  bool vector_loop_ = false;  // emitting the unrolled per-element body of a vector access
};

}  // namespace

std::string generate_cuda(const Program& p, const Variant& v) {
  KILN_CHECK(p.row ? v.rank >= 1 && (v.access.empty() || v.access.size() == p.inputs.size())
                   : v.access.size() == p.inputs.size(),
             "compile", "a kernel variant that does not fit its program");
  KILN_CHECK(v.vec == 1 || v.vec == 2 || v.vec == 4 || v.vec == 8, "compile", "a vector width of {} (1, 2, 4 or 8)", v.vec);
  if (!p.row && v.vec > 1)
    for (Access a : v.access)
      KILN_CHECK(a != Access::strided, "compile", "a vector variant of a pointwise program with strided inputs");
  return Emitter(p, v).run();
}

}  // namespace kiln::compile

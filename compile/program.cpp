// Lowering of fused nodes into program instructions, the pass schedule of row programs, printing.
#include "compile/program.h"

#include <fmt/format.h>

#include <limits>
#include <map>
#include <unordered_map>

#include "core/ops/activation.h"
#include "core/ops/copy.h"
#include "core/ops/creation.h"
#include "core/ops/elementwise.h"
#include "core/ops/norm.h"
#include "core/ops/reduce.h"

namespace kiln::compile {

const char* reduce_op_name(ReduceOp r) {
  static const char* const names[] = {"sum", "mean", "max", "min"};
  return names[static_cast<int>(r)];
}

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

class Builder {
 public:
  Builder(Program& p, const Graph& g, const std::vector<Level>& level) : p_(p), g_(g), level_(level) {}

  // Appends `in`, or returns the equal instruction already there (value numbering): fused ops lower
  // shared work separately (swiglu and swiglu_backward each compute sigmoid(gate)). Every instruction
  // but a dropout (its own random numbers) is a pure function of its operands; loads are shared
  // through loads_ (by graph value and level).
  int emit(Instr in) {
    in.stage = 0;
    for (int o : {in.a, in.b, in.c})
      if (o >= 0) in.stage = std::max(in.stage, p_.instrs[static_cast<size_t>(o)].stage);
    if (in.op == Op::reduce) in.stage += 1;
    const bool pure = in.op != Op::dropout && in.op != Op::load;
    const auto key = std::make_tuple(in.op, in.level, in.dtype, in.a, in.b, in.c, in.code, std::bit_cast<uint64_t>(in.value));
    if (pure)
      if (auto it = numbered_.find(key); it != numbered_.end()) return it->second;
    p_.instrs.push_back(in);
    const int i = static_cast<int>(p_.instrs.size()) - 1;
    if (pure) numbered_[key] = i;
    return i;
  }
  DType dtype(int i) const { return p_.instrs[static_cast<size_t>(i)].dtype; }

  // The instruction holding graph value v at level `lv`: computed in the group, a constant (fill) or a load.
  int operand(int v, Level lv) {
    if (auto it = reg_.find(v); it != reg_.end()) return it->second;
    const Value& val = g_.values[static_cast<size_t>(v)];
    if (val.producer >= 0) {
      if (const auto* f = dynamic_cast<const prim::Fill*>(g_.nodes[static_cast<size_t>(val.producer)].op.get()))
        return constant(f->value(), val.meta.dtype, lv);
    }
    auto key = std::make_pair(v, lv);
    if (auto it = loads_.find(key); it != loads_.end()) return it->second;
    p_.inputs.push_back({v, lv});
    Instr in;
    in.op = Op::load;
    in.level = lv;
    in.dtype = val.meta.dtype;
    in.slot = static_cast<int>(p_.inputs.size()) - 1;
    return loads_[key] = emit(in);
  }
  int constant(double value, DType dt, Level lv) {
    Instr in;
    in.op = Op::constant;
    in.level = lv;
    in.dtype = dt;
    in.value = value;
    return emit(in);
  }
  int row_length(DType dt) {
    Instr in;
    in.op = Op::row_length;
    in.level = Level::row;
    in.dtype = dt;
    return emit(in);
  }
  static Level join(Level a, Level b) { return a == Level::element || b == Level::element ? Level::element : Level::row; }
  Level lvl(int i) const { return p_.instrs[static_cast<size_t>(i)].level; }
  int cast(int a, DType to) {
    if (dtype(a) == to) return a;
    Instr in;
    in.op = Op::cast;
    in.level = lvl(a);
    in.dtype = to;
    in.a = a;
    return emit(in);
  }
  int unary(UnaryOp op, int a) {
    Instr in;
    in.op = Op::unary;
    in.level = lvl(a);
    in.dtype = dtype(a);
    in.code = static_cast<int>(op);
    in.a = a;
    return emit(in);
  }
  int binary(BinaryOp op, int a, int b) {
    Instr in;
    in.op = Op::binary;
    in.level = join(lvl(a), lvl(b));
    in.dtype = binary_is_comparison(op) ? DType::boolean : dtype(a);
    in.code = static_cast<int>(op);
    in.a = a;
    in.b = b;
    return emit(in);
  }
  int where(int c, int a, int b) {
    Instr in;
    in.op = Op::where;
    in.level = join(lvl(c), join(lvl(a), lvl(b)));
    in.dtype = dtype(a);
    in.a = c;
    in.b = a;
    in.c = b;
    return emit(in);
  }
  int reduce(ReduceOp op, int a, DType dt, bool in_result_type = false) {
    Instr in;
    in.value = in_result_type ? 1.0 : 0.0;
    in.op = Op::reduce;
    in.level = Level::row;
    in.dtype = dt;
    in.code = static_cast<int>(op);
    in.a = a;
    return emit(in);
  }
  int dropout(int a, double p, int node) {
    p_.rng_nodes.push_back(node);
    Instr in;
    in.op = Op::dropout;
    in.level = Level::element;
    in.dtype = dtype(a);
    in.a = a;
    in.value = p;
    in.slot = static_cast<int>(p_.rng_nodes.size()) - 1;
    return emit(in);
  }
  void define(int v, int instr) { reg_[v] = instr; }
  Level level_of(int v) const { return level_[static_cast<size_t>(v)]; }

 private:
  Program& p_;
  const Graph& g_;
  const std::vector<Level>& level_;
  std::unordered_map<int, int> reg_;
  std::map<std::pair<int, Level>, int> loads_;
  std::map<std::tuple<Op, Level, DType, int, int, int, int, uint64_t>, int> numbered_;
};

// softmax / log_softmax of a row as the CPU kernel computes it: shift by the row maximum (0 for a
// row of -inf), scale by 1/sum (softmax) or subtract log(sum) (log_softmax), 0 or -inf for dead rows.
int lower_softmax(Builder& b, int x, bool log, DType out) {
  const DType c = compute_dtype(b.dtype(x));
  const int xc = b.cast(x, c);
  const int m = b.reduce(ReduceOp::max, xc, c);
  const int dead = b.binary(BinaryOp::eq, m, b.constant(-kInf, c, Level::row));
  const int shift = b.where(dead, b.constant(0.0, c, Level::row), m);
  const int d = b.binary(BinaryOp::sub, xc, shift);
  const int e = b.unary(UnaryOp::exp, d);
  const int s = b.reduce(ReduceOp::sum, e, c);
  const int scale = b.where(dead, b.constant(0.0, c, Level::row),
                            log ? b.unary(UnaryOp::log, s) : b.binary(BinaryOp::div, b.constant(1.0, c, Level::row), s));
  return b.cast(log ? b.binary(BinaryOp::sub, d, scale) : b.binary(BinaryOp::mul, e, scale), out);
}

// log(sum(exp(x))) of a row: m + log(sum(exp(x - m))), or m itself when it is not finite.
int lower_logsumexp(Builder& b, int x, DType out) {
  const DType c = compute_dtype(b.dtype(x));
  const int xc = b.cast(x, c);
  const int m = b.reduce(ReduceOp::max, xc, c);
  const int fin = b.binary(BinaryOp::lt, b.unary(UnaryOp::abs, m), b.constant(kInf, c, Level::row));
  const int shift = b.where(fin, m, b.constant(0.0, c, Level::row));
  const int s = b.reduce(ReduceOp::sum, b.unary(UnaryOp::exp, b.binary(BinaryOp::sub, xc, shift)), c);
  return b.cast(b.where(fin, b.binary(BinaryOp::add, shift, b.unary(UnaryOp::log, s)), m), out);
}

// x * (1 / sqrt(mean(x^2) + eps)) * w in the compute type, rounded once (the CPU kernel's order).
int lower_rms_norm(Builder& b, int x, int w, double eps, DType out) {
  const DType c = compute_dtype(b.dtype(x));
  const int xc = b.cast(x, c);
  const int ss = b.reduce(ReduceOp::sum, b.binary(BinaryOp::mul, xc, xc), c, /*in_result_type=*/true);
  const int ms = b.binary(BinaryOp::div, ss, b.row_length(c));
  const int den = b.unary(UnaryOp::sqrt, b.binary(BinaryOp::add, ms, b.constant(eps, c, Level::row)));
  const int rstd = b.binary(BinaryOp::div, b.constant(1.0, c, Level::row), den);
  return b.cast(b.binary(BinaryOp::mul, b.binary(BinaryOp::mul, xc, rstd), b.cast(w, c)), out);
}

}  // namespace

Program lower_group(const Graph& g, const std::vector<int>& nodes, const std::vector<Level>& level,
                    const std::vector<bool>& escapes, int domain_value, bool row) {
  Program p;
  p.row = row;
  p.domain_value = domain_value;
  Builder b(p, g, level);
  for (int n : nodes) {
    const Node& node = g.nodes[static_cast<size_t>(n)];
    const Primitive& op = *node.op;
    const int out0 = node.outputs[0];
    const Level lv = b.level_of(out0);
    const DType odt = g.values[static_cast<size_t>(out0)].meta.dtype;
    auto in = [&](size_t i, Level l) { return b.operand(node.inputs[i], l); };
    if (const auto* u = dynamic_cast<const prim::Unary*>(&op)) {
      b.define(out0, b.cast(b.unary(u->op(), in(0, lv)), odt));
    } else if (const auto* bi = dynamic_cast<const prim::Binary*>(&op)) {
      b.define(out0, b.binary(bi->op(), in(0, lv), in(1, lv)));
    } else if (dynamic_cast<const prim::Where*>(&op)) {
      b.define(out0, b.where(in(0, lv), in(1, lv), in(2, lv)));
    } else if (dynamic_cast<const prim::Copy*>(&op)) {
      b.define(out0, b.cast(in(0, lv), odt));
    } else if (const auto* d = dynamic_cast<const prim::Dropout*>(&op)) {
      b.define(out0, b.dropout(in(0, Level::element), d->p(), n));
    } else if (dynamic_cast<const prim::SwiGlu*>(&op)) {
      const DType c = compute_dtype(odt);
      const int a = b.cast(in(0, lv), c), u = b.cast(in(1, lv), c);
      const int den = b.binary(BinaryOp::add, b.constant(1.0, c, lv), b.unary(UnaryOp::exp, b.unary(UnaryOp::neg, a)));
      b.define(out0, b.cast(b.binary(BinaryOp::mul, b.binary(BinaryOp::div, a, den), u), odt));
    } else if (dynamic_cast<const prim::SwiGluBackward*>(&op)) {
      const DType c = compute_dtype(odt);
      const int a = b.cast(in(0, lv), c), u = b.cast(in(1, lv), c), gv = b.cast(in(2, lv), c);
      const int one = b.constant(1.0, c, lv);
      const int sig = b.binary(BinaryOp::div, one,
                               b.binary(BinaryOp::add, one, b.unary(UnaryOp::exp, b.unary(UnaryOp::neg, a))));
      const int bump = b.binary(BinaryOp::add, one, b.binary(BinaryOp::mul, a, b.binary(BinaryOp::sub, one, sig)));
      const int dgate = b.binary(BinaryOp::mul, b.binary(BinaryOp::mul, b.binary(BinaryOp::mul, gv, u), sig), bump);
      b.define(out0, b.cast(dgate, odt));
      b.define(node.outputs[1], b.cast(b.binary(BinaryOp::mul, b.binary(BinaryOp::mul, gv, a), sig), odt));
    } else if (const auto* r = dynamic_cast<const prim::Reduce*>(&op)) {
      const int x = in(0, Level::element);
      const ReduceOp ro = r->kind() == prim::ReduceKind::sum    ? ReduceOp::sum
                          : r->kind() == prim::ReduceKind::mean ? ReduceOp::mean
                          : r->kind() == prim::ReduceKind::max  ? ReduceOp::max
                                                                : ReduceOp::min;
      // Integers and bools sum in i64 (the output dtype); floats in their compute type.
      const DType acc = is_floating(odt) ? compute_dtype(odt) : odt;
      b.define(out0, b.cast(b.reduce(ro, b.cast(x, is_floating(odt) ? b.dtype(x) : acc), acc), odt));
    } else if (const auto* s = dynamic_cast<const prim::Softmax*>(&op)) {
      b.define(out0, lower_softmax(b, in(0, Level::element), s->log(), odt));
    } else if (dynamic_cast<const prim::LogSumExp*>(&op)) {
      b.define(out0, lower_logsumexp(b, in(0, Level::element), odt));
    } else if (const auto* rn = dynamic_cast<const prim::RmsNorm*>(&op)) {
      b.define(out0, lower_rms_norm(b, in(0, Level::element), in(1, Level::element), rn->eps(), odt));
    } else {
      KILN_FAIL("compile", "cannot fuse op {}", op.name());
    }
    for (int v : node.outputs)
      if (escapes[static_cast<size_t>(v)]) {
        // the instruction defined last for v
        const int i = b.operand(v, b.level_of(v));
        p.outputs.push_back({i, v, b.level_of(v)});
      }
  }
  p.passes = 1;
  if (row) {
    int last = 0;
    for (const Instr& in : p.instrs)
      if (in.op == Op::reduce) last = std::max(last, p.instrs[static_cast<size_t>(in.a)].stage);
    for (const Program::Output& o : p.outputs)
      if (o.level == Level::element) last = std::max(last, p.instrs[static_cast<size_t>(o.instr)].stage);
    p.passes = last + 1;
  }
  return p;
}

std::vector<std::vector<bool>> Program::pass_masks() const {
  std::vector<std::vector<bool>> masks(static_cast<size_t>(passes), std::vector<bool>(instrs.size(), false));
  auto mark = [&](std::vector<bool>& m, int root) {
    std::vector<int> stack{root};
    while (!stack.empty()) {
      const int i = stack.back();
      stack.pop_back();
      const Instr& in = instrs[static_cast<size_t>(i)];
      if (in.level != Level::element || m[static_cast<size_t>(i)]) continue;
      m[static_cast<size_t>(i)] = true;
      for (int o : {in.a, in.b, in.c})
        if (o >= 0) stack.push_back(o);
    }
  };
  for (size_t i = 0; i < instrs.size(); ++i) {
    const Instr& in = instrs[i];
    if (!row) {
      if (in.level == Level::element) masks[0][i] = true;
    } else if (in.op == Op::reduce) {
      mark(masks[static_cast<size_t>(instrs[static_cast<size_t>(in.a)].stage)], in.a);
    }
  }
  if (row)
    for (const Output& o : outputs)
      if (o.level == Level::element) mark(masks[static_cast<size_t>(instrs[static_cast<size_t>(o.instr)].stage)], o.instr);
  return masks;
}

std::string Program::str() const {
  std::string s = fmt::format("    {} program, {} pass{}, domain %{}\n", row ? "row" : "pointwise", passes,
                              passes == 1 ? "" : "es", domain_value);
  for (size_t i = 0; i < instrs.size(); ++i) {
    const Instr& in = instrs[i];
    std::string what;
    switch (in.op) {
      case Op::load: what = fmt::format("load in{} (%{})", in.slot, inputs[static_cast<size_t>(in.slot)].value); break;
      case Op::constant: what = fmt::format("const {}", in.value); break;
      case Op::row_length: what = "row_length"; break;
      case Op::unary: what = fmt::format("{} r{}", unary_op_name(static_cast<UnaryOp>(in.code)), in.a); break;
      case Op::binary: what = fmt::format("{} r{}, r{}", binary_op_name(static_cast<BinaryOp>(in.code)), in.a, in.b); break;
      case Op::where: what = fmt::format("where r{}, r{}, r{}", in.a, in.b, in.c); break;
      case Op::cast: what = fmt::format("cast r{}", in.a); break;
      case Op::dropout: what = fmt::format("dropout r{} p={} rng{}", in.a, in.value, in.slot); break;
      case Op::reduce:
        what = fmt::format("row_{} r{}{}", reduce_op_name(static_cast<ReduceOp>(in.code)), in.a, in.value != 0.0 ? " (in type)" : "");
        break;
    }
    s += fmt::format("    r{} = {} : {} {}{}\n", i, what, dtype_name(in.dtype), in.level == Level::row ? "row" : "elem",
                     row ? fmt::format(" @{}", in.stage) : "");
  }
  for (const Output& o : outputs) s += fmt::format("    out %{} <- r{}\n", o.value, o.instr);
  return s;
}

}  // namespace kiln::compile

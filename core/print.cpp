// Readable printing of tensors, PyTorch-like: nested brackets, aligned columns, and "..." past
// 1000 elements (first and last 3 of each dim).
#include <cmath>
#include <ostream>

#include "core/ops.h"

namespace kiln {
namespace {

constexpr int64_t kSummariseAbove = 1000;
constexpr int64_t kEdge = 3;

struct Printer {
  std::vector<double> values;  // row-major
  Shape shape;
  bool floating, boolean, summarise;
  bool sci = false;
  size_t width = 1;

  std::string fmt_one(double v) const {
    if (boolean) return v != 0 ? "true" : "false";
    if (!floating) return fmt::format("{}", static_cast<int64_t>(v));
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    return sci ? fmt::format("{:.4e}", v) : fmt::format("{:.4f}", v);
  }

  std::vector<int64_t> shown(int64_t n) const {
    std::vector<int64_t> idx;
    if (summarise && n > 2 * kEdge) {
      for (int64_t i = 0; i < kEdge; ++i) idx.push_back(i);
      idx.push_back(-1);  // "..."
      for (int64_t i = n - kEdge; i < n; ++i) idx.push_back(i);
    } else {
      for (int64_t i = 0; i < n; ++i) idx.push_back(i);
    }
    return idx;
  }

  void scan(size_t d, int64_t base, std::vector<double>& seen) const {
    if (d == shape.size()) { seen.push_back(values[static_cast<size_t>(base)]); return; }
    int64_t stride = numel(Shape(shape.begin() + static_cast<long>(d) + 1, shape.end()));
    for (int64_t i : shown(shape[d])) if (i >= 0) scan(d + 1, base + i * stride, seen);
  }

  void emit(std::string& out, size_t d, int64_t base, size_t indent) const {
    if (d == shape.size()) {
      std::string s = fmt_one(values[static_cast<size_t>(base)]);
      out += std::string(width - std::min(width, s.size()), ' ') + s;
      return;
    }
    int64_t stride = numel(Shape(shape.begin() + static_cast<long>(d) + 1, shape.end()));
    out += '[';
    std::vector<int64_t> idx = shown(shape[d]);
    for (size_t k = 0; k < idx.size(); ++k) {
      if (k > 0) {
        out += ',';
        if (d + 1 == shape.size()) out += ' ';
        else out += std::string(shape.size() - d - 1, '\n') + std::string(indent + d + 1, ' ');
      }
      if (idx[k] < 0) out += "...";
      else emit(out, d + 1, base + idx[k] * stride, indent);
    }
    out += ']';
  }
};

}  // namespace

std::string Tensor::to_string() const {
  if (!defined()) return "tensor(undefined)";
  Tensor host = cast(detach().to(kCPU), DType::f64).contiguous();  // detached: records no history
  Printer p;
  p.values = host.to_vector<double>();
  p.shape = shape();
  p.floating = is_floating(dtype());
  p.boolean = dtype() == DType::boolean;
  p.summarise = numel() > kSummariseAbove;
  std::vector<double> seen;
  if (numel() > 0) p.scan(0, 0, seen);
  double big = 0, small = INFINITY;
  for (double v : seen) {
    if (!std::isfinite(v)) continue;
    big = std::max(big, std::fabs(v));
    if (v != 0) small = std::min(small, std::fabs(v));
  }
  p.sci = p.floating && (big >= 1e6 || (small < 1e-4 && big < 1e-2 && small > 0) || (small < 1e-4 && big / small > 1e6));
  for (double v : seen) p.width = std::max(p.width, p.fmt_one(v).size());
  std::string out = "tensor(";
  if (numel() == 0) out += "[]";
  else p.emit(out, 0, 0, 7);
  out += fmt::format(", shape={}, dtype={}", shape_str(shape()), dtype_name(dtype()));
  if (!device().is_cpu()) out += ", device=" + device().str();
  if (requires_grad()) out += grad_fn() ? ", grad_fn" : ", requires_grad";
  return out + ")";
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.to_string(); }

}  // namespace kiln

// Where a CUDA program's GPU time goes, op by op: a dispatch handler that puts CUDA events around each
// op it sees (their cost included in what it measures) and counts the GEMM and attention FLOPs from the
// ops' shapes. Fused groups of a compiled plan run their kernels without dispatch and are not seen.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/cuda/runtime.h"
#include "core/dispatch.h"
#include "core/ops/attention.h"

namespace kiln::bench {

// GEMMs and attention; NF4 dequantisation (before each base GEMM) apart.
inline bool is_heavy(const std::string& n) {
  return n == "matmul" || n == "scaled_dot_product_attention" || n == "sdpa_backward";
}
inline bool is_dequant(const std::string& n) { return n == "nf4_dequantize" || n == "blockwise8_dequantize"; }

// The share of a training step an op belongs to (the rows of print_step_breakdown).
inline const char* step_category(const std::string& n) {
  if (n == "matmul") return "GEMM (cuBLASLt)";
  if (n == "scaled_dot_product_attention" || n == "sdpa_backward") return "attention";
  if (is_dequant(n)) return "NF4 dequantisation";
  if (n.rfind("cross_entropy", 0) == 0) return "loss (cross-entropy)";
  if (n == "adamw_step" || n == "multi_tensor_l2_norm" || n == "multi_tensor_scale") return "optimizer, grad clip";
  return "elementwise, norms, copies";
}

// Floating-point operations of one op from its inputs and outputs: 2·M·N·K a GEMM; attention
// 4·B·Hq·T·S·D forward (halved when causal), 2.5 times that backward; 0 otherwise.
inline double op_flops(const Primitive& op, const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
  const std::string n = op.name();
  if (n == "matmul" && !out.empty() && !in.empty())
    return 2.0 * static_cast<double>(out[0].numel()) * static_cast<double>(in[0].shape().back());
  const auto attention = [&](bool causal) {
    const Shape& q = in[0].shape();  // (B, Hq, T, D)
    const Shape& k = in[1].shape();  // (B, Hkv, S, D)
    return 4.0 * static_cast<double>(q[0] * q[1] * q[2] * k[2] * q[3]) * (causal ? 0.5 : 1.0);
  };
  if (const auto* f = dynamic_cast<const prim::ScaledDotProductAttention*>(&op)) return attention(f->causal());
  if (const auto* b = dynamic_cast<const prim::SdpaBackward*>(&op)) return 2.5 * attention(b->causal());
  return 0.0;
}

// Times the ops that pass through dispatch on this thread while it is in a HandlerScope: every op
// (`all`) or only GEMMs, attention and dequantisation. Counts the kernels (non-view ops) it sees.
struct OpTimer : DispatchHandler {
  struct Span {
    std::string name;
    std::string gemm_shape;  // "M x N x K" of a GEMM (", a^T" / ", b^T": stored transposed; ", + C": an addend), else empty
    double flops = 0;
    std::unique_ptr<cuda::Event> start, stop;
  };
  struct Row {
    std::string name;
    int calls = 0;
    double ms = 0, flops = 0;
  };
  explicit OpTimer(bool all) : all_(all) {}
  std::vector<Span> spans;
  int kernels = 0;

  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (op->is_view()) return dispatch_next(op, inputs);
    ++kernels;
    if (!timed(op->name())) return dispatch_next(op, inputs);
    const size_t s = open(op->name());
    std::vector<Tensor> out = dispatch_next(op, inputs);
    close(spans[s], *op, inputs, out);
    return out;
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    ++kernels;
    if (!timed(op->name())) return dispatch_next_into(op, inputs, outputs);
    const size_t s = open(op->name());
    dispatch_next_into(op, inputs, outputs);
    close(spans[s], *op, inputs, outputs);
  }
  // GPU ms of the spans whose op name passes `pick`.
  double ms(const std::function<bool(const std::string&)>& pick) {
    double total = 0;
    for (Span& s : spans)
      if (pick(s.name)) total += elapsed(s);
    return total;
  }
  // One row per key of the spans (the op name by default; an empty key leaves the span out), slowest first.
  std::vector<Row> rows(const std::function<std::string(const Span&)>& key = {}) {
    std::map<std::string, Row> acc;
    for (Span& s : spans) {
      const std::string k = key ? key(s) : s.name;
      if (k.empty()) continue;
      Row& r = acc[k];
      r.name = k;
      ++r.calls;
      r.ms += elapsed(s);
      r.flops += s.flops;
    }
    std::vector<Row> out;
    for (auto& [k, r] : acc) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const Row& a, const Row& b) { return a.ms > b.ms; });
    return out;
  }

 private:
  bool timed(const std::string& name) const { return all_ || is_heavy(name) || is_dequant(name); }
  // The index of the new span (ops run inside the op may add spans).
  size_t open(const std::string& name) {
    spans.push_back(Span{name, {}, 0, std::make_unique<cuda::Event>(true), std::make_unique<cuda::Event>(true)});
    spans.back().start->record();
    return spans.size() - 1;
  }
  static void close(Span& s, const Primitive& op, const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    s.stop->record();
    s.flops = op_flops(op, in, out);
    if (s.name == "matmul" && !out.empty() && !in.empty() && out[0].dim() >= 1) {
      const int64_t n = out[0].shape().back(), m = n > 0 ? out[0].numel() / n : 0;
      s.gemm_shape = std::to_string(m) + " x " + std::to_string(n) + " x " + std::to_string(in[0].shape().back());
      // operands stored transposed (unit stride on the row dim), an addend in the epilogue
      const auto transposed = [](const Tensor& t) { return t.dim() >= 2 && t.size(-1) > 1 && t.strides().back() != 1; };
      if (transposed(in[0])) s.gemm_shape += ", a^T";
      if (in.size() > 1 && transposed(in[1])) s.gemm_shape += ", b^T";
      if (in.size() > 2) s.gemm_shape += ", + C";
    }
  }
  static double elapsed(Span& s) {
    s.stop->synchronize();
    return static_cast<double>(s.start->elapsed_ms(*s.stop));
  }
  bool all_;
};

// A training step's GPU time by category, each op timed alone (one more step, with events around every
// op): ms, share of `step_ms` (the step timed without events), effective TFLOP/s against `peak_tflops`;
// "between ops" is what the events did not cover: launch gaps, host waits, fused kernels.
inline void print_step_breakdown(const std::function<void()>& step, double step_ms, double peak_tflops) {
  cuda::synchronize();
  OpTimer timer(true);
  {
    HandlerScope scope(&timer);
    step();
  }
  cuda::synchronize();
  const std::vector<OpTimer::Row> rows =
      timer.rows([](const OpTimer::Span& s) { return std::string(step_category(s.name)); });
  std::printf("\nstep of %.1f ms by category (each op timed with events around it):\n"
              "| category | calls | GPU ms | share | TFLOP/s | of %.0f |\n|---|---|---|---|---|---|\n",
              step_ms, peak_tflops);
  double covered = 0;
  for (const OpTimer::Row& r : rows) {
    covered += r.ms;
    const double tflops = r.flops > 0 ? r.flops / (r.ms * 1e-3) / 1e12 : 0;
    if (tflops > 0)
      std::printf("| %s | %d | %.2f | %.1f%% | %.0f | %.0f%% |\n", r.name.c_str(), r.calls, r.ms, 100 * r.ms / step_ms,
                  tflops, 100 * tflops / peak_tflops);
    else
      std::printf("| %s | %d | %.2f | %.1f%% | | |\n", r.name.c_str(), r.calls, r.ms, 100 * r.ms / step_ms);
  }
  std::printf("| between ops | | %.2f | %.1f%% | | |\n", step_ms - covered, 100 * (step_ms - covered) / step_ms);
  std::printf("\nslowest ops:\n| op | calls | GPU ms | TFLOP/s |\n|---|---|---|---|\n");
  const std::vector<OpTimer::Row> ops = timer.rows();
  for (size_t i = 0; i < ops.size() && i < 12; ++i) {
    const OpTimer::Row& r = ops[i];
    std::printf("| %s | %d | %.2f | %s |\n", r.name.c_str(), r.calls, r.ms,
                r.flops > 0 ? std::to_string(static_cast<int>(r.flops / (r.ms * 1e-3) / 1e12)).c_str() : "");
  }
  std::printf("\nGEMMs by output rows x columns x inner size (slowest 16):\n"
              "| M x N x K | calls | GPU ms | share | TFLOP/s |\n|---|---|---|---|---|\n");
  const std::vector<OpTimer::Row> gemms = timer.rows([](const OpTimer::Span& s) { return s.gemm_shape; });
  for (size_t i = 0; i < gemms.size() && i < 16; ++i) {
    const OpTimer::Row& r = gemms[i];
    std::printf("| %s | %d | %.2f | %.1f%% | %.0f |\n", r.name.c_str(), r.calls, r.ms, 100 * r.ms / step_ms,
                r.flops / (r.ms * 1e-3) / 1e12);
  }
}

}  // namespace kiln::bench

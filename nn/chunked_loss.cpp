// chunked_linear_loss: a custom autograd::Function that runs the loss chunk by chunk and takes each
// chunk's gradients during the forward pass (autograd on the chunk's logits), the chunk-size rule,
// and the ready-made per-token losses (cross-entropy with label smoothing and z-loss, focal loss).
#include "nn/chunked_loss.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/error.h"
#include "core/ops/elementwise.h"

namespace kiln::nn {
namespace {

constexpr const char* kOp = "chunked_linear_loss";

// The built-in cross-entropy LossFn: a named type, so chunked_linear_loss recognises it (through
// std::function::target) and runs it as one fused kernel per chunk.
struct CrossEntropyLossFn {
  double smoothing = 0.0, z = 0.0;
  Tensor operator()(const Tensor& logits, const Tensor& targets) const {
    // Targets are valid classes (checked on the host by chunked_linear_loss, ignored ones replaced
    // by 0), so neither ignore_index nor the device-side check (a CUDA sync per call) is needed.
    Tensor loss = cross_entropy_unchecked(logits, targets, -1, Reduction::none);  // (n) nll
    if (smoothing == 0.0 && z == 0.0) return loss;
    Tensor lse = logsumexp(logits, {1});  // (n)
    if (smoothing != 0.0) loss = add(mul(loss, 1.0 - smoothing), mul(sub(lse, mean(logits, {1})), smoothing));
    if (z != 0.0) loss = add(loss, mul(square(lse), z));
    return loss;
  }
};

// f32 for bf16/f16/f32 inputs, f64 for f64 inputs.
DType loss_dtype_for(DType compute) { return compute == DType::f64 ? DType::f64 : DType::f32; }

struct ChunkPlan {
  int64_t chunk = 1;                 // tokens per chunk (the last may be smaller)
  int64_t group = 1;                 // tokens per gradient group, a multiple of chunk
  std::vector<int64_t> valid;        // non-ignored tokens per chunk
  double scale = 1.0;                // 1 (sum) or 1 / #non-ignored tokens (mean; 0 when there are none)
  bool need_hidden = false, need_weight = false, need_bias = false;
  bool hidden_in_place = false;      // d(hidden) is written over hidden (overwrite_hidden, and it applies)
};

class ChunkedLinearLossFunction final : public autograd::Function {
 public:
  ChunkedLinearLossFunction(Tensor targets, LossFn loss_fn, ChunkedLossOptions options, ChunkPlan plan)
      : targets_(std::move(targets)), loss_fn_(std::move(loss_fn)), options_(std::move(options)), plan_(std::move(plan)) {}
  const char* name() const override { return kOp; }
  std::vector<Tensor> forward(const std::vector<Tensor>& inputs) override;
  std::vector<Tensor> backward(const std::vector<Tensor>& grad_outputs) override;

 private:
  // The built-in cross-entropy with gradients wanted: one fused kernel per chunk (see the header).
  std::vector<Tensor> forward_fused(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                    const CrossEntropyLossFn& ce);
  struct ChunkConstants {
    Tensor zero;  // () in the loss dtype
    Tensor seed;  // () the scale, d(loss)/d(chunk sum)
  };
  // The summed loss of one chunk's non-ignored tokens and, when `grad`, d(scale * that)/d(logits)
  // (n, V) in the loss dtype. `between` runs after the loss's forward, before its backward.
  std::pair<Tensor, Tensor> chunk_loss(const Tensor& logits, const Tensor& safe, const Tensor& valid, bool grad,
                                       const ChunkConstants& k, const std::function<void()>& between) const;

  Tensor targets_;  // (N) int
  LossFn loss_fn_;
  ChunkedLossOptions options_;
  ChunkPlan plan_;
  Shape hidden_shape_;
  bool scaled_ = false;  // backward scaled the stored gradients in place
};

std::pair<Tensor, Tensor> ChunkedLinearLossFunction::chunk_loss(const Tensor& logits_in, const Tensor& safe,
                                                                const Tensor& valid, bool grad,
                                                                const ChunkConstants& k,
                                                                const std::function<void()>& between) const {
  const int64_t n = logits_in.size(0);
  const Device dev = logits_in.device();
  Tensor logits = logits_in;
  if (grad) logits.set_requires_grad(true);  // a leaf: the matmul ran with grad mode off
  Tensor chunk_sum;                          // ()
  {
    const bool prev = autograd::grad_enabled();
    autograd::set_grad_enabled(grad);
    try {
      Tensor per = loss_fn_(logits, safe);  // (n)
      KILN_CHECK(per.defined() && per.dim() == 1 && per.size(0) == n && is_floating(per.dtype()), kOp,
                 "loss_fn must return per-token losses of shape ({},) and a float dtype, found {} {}", n,
                 per.defined() ? dtype_name(per.dtype()) : "undefined", per.defined() ? shape_str(per.shape()) : "");
      KILN_CHECK(per.device() == dev, kOp, "loss_fn returned a tensor on {}, expected {}", per.device().str(), dev.str());
      chunk_sum = sum(where(valid, cast(per, k.zero.dtype()), k.zero));
    } catch (...) {
      autograd::set_grad_enabled(prev);
      throw;
    }
    autograd::set_grad_enabled(prev);
  }
  between();
  Tensor dlogits;  // (n, V)
  if (grad) {
    if (chunk_sum.requires_grad()) {
      dlogits = autograd::grad({chunk_sum}, {logits}, {k.seed})[0];
    } else {  // a loss that does not depend on the logits
      dlogits = zeros(logits.shape(), k.zero.dtype(), dev);
    }
  }
  return {chunk_sum.detach(), dlogits};
}

std::vector<Tensor> ChunkedLinearLossFunction::forward_fused(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                             const CrossEntropyLossFn& ce) {
  const int64_t v = weight.size(0), h = weight.size(1), n_tok = x.size(0);
  const DType cdt = x.dtype(), ldt = loss_dtype_for(cdt);
  const Device dev = x.device();
  const Tensor wt = transpose(weight, 0, 1);                    // (H, V) view
  const Tensor scale = scalar_tensor(plan_.scale, ldt, dev);    // () d(loss)/d(chunk sum)
  Tensor loss = zeros({}, ldt, dev);                            // the sum of the chunk sums
  Tensor dh = !plan_.need_hidden ? Tensor() : plan_.hidden_in_place ? x : empty({n_tok, h}, cdt, dev);  // (N, H)
  Tensor dw = plan_.need_weight ? empty({v, h}, weight.dtype(), dev) : Tensor();  // (V, H), accumulated in place
  Tensor db = plan_.need_bias ? zeros({v}, ldt, dev) : Tensor();                 // (V)
  bool dw_written = false;
  for (int64_t s = 0, ci = 0; s < n_tok; s += plan_.chunk, ++ci) {
    const int64_t n = std::min(plan_.chunk, n_tok - s);
    if (plan_.valid[static_cast<size_t>(ci)] == 0) {  // every target ignored: no loss, no gradient
      if (dh.defined()) fill_(narrow(dh, 0, s, n), 0.0);
      continue;
    }
    const Tensor xc = narrow(x, 0, s, n);  // (n, H)
    Tensor z = matmul(xc, wt);             // (n, V) logits, then (after the kernel) their gradient
    if (bias.defined()) z = add(z, bias);
    loss = add(loss, sum(cross_entropy_loss_grad_(z, narrow(targets_, 0, s, n), scale, options_.ignore_index,
                                                  ce.smoothing, ce.z)));
    if (db.defined()) db = add(db, sum(cast(z, ldt), {0}));
    if (dw.defined()) {
      matmul_into(dw, transpose(z, 0, 1), xc, dw_written);
      dw_written = true;
    }
    if (dh.defined()) matmul_into(narrow(dh, 0, s, n), z, weight);  // the last read of xc: may overwrite it
  }
  if (dw.defined() && !dw_written) fill_(dw, 0.0);
  if (db.defined()) db = cast(db, bias.dtype());
  save_for_backward({dh, dw, db});
  return {mul(loss, plan_.scale)};
}

std::vector<Tensor> ChunkedLinearLossFunction::forward(const std::vector<Tensor>& inputs) {
  const Tensor& weight = inputs[1];  // (V, H)
  const Tensor bias = inputs.size() > 2 ? inputs[2] : Tensor();  // (V)
  hidden_shape_ = inputs[0].shape();
  const int64_t v = weight.size(0), h = weight.size(1);
  const Tensor x = reshape(inputs[0], {-1, h});  // (N, H)
  const bool any_grad = plan_.need_hidden || plan_.need_weight || plan_.need_bias;
  if (const auto* ce = loss_fn_.target<CrossEntropyLossFn>(); ce != nullptr && any_grad) {
    return forward_fused(x, weight, bias, *ce);
  }
  const int64_t n_tok = x.size(0);
  const DType cdt = x.dtype(), ldt = loss_dtype_for(cdt);
  const Device dev = x.device();
  const Tensor wt = transpose(weight, 0, 1);  // (H, V) view
  const int64_t chunk = plan_.chunk;
  const int64_t n_chunks = (n_tok + chunk - 1) / chunk;
  const ChunkConstants k{scalar_tensor(0.0, ldt, dev), scalar_tensor(plan_.scale, ldt, dev)};
  const Tensor valid = ne(targets_, static_cast<double>(options_.ignore_index));              // (N) bool
  const Tensor safe = where(valid, targets_, scalar_tensor(0.0, targets_.dtype(), dev));      // (N) in [0, V)

  Tensor loss = zeros({}, ldt, dev);  // the sum of the chunk sums, scaled at the end
  // (N, H); every row is written (chunks whose targets are all ignored: zeros)
  Tensor dh = !plan_.need_hidden ? Tensor() : plan_.hidden_in_place ? x : empty({n_tok, h}, cdt, dev);
  Tensor db = plan_.need_bias ? zeros({v}, ldt, dev) : Tensor();           // (V) accumulated in the loss dtype

  // Trainable weight: the dlogits rows of a group of chunks (compute dtype); per group, d(hidden)
  // rows = group @ W and dW += group^T @ hidden_group by row blocks (few f32 accumulation passes).
  // Frozen weight: no group; d(hidden) rows = dlogits @ W per chunk.
  Tensor group = plan_.need_weight ? empty({std::min(plan_.group, n_tok), v}, cdt, dev) : Tensor();  // (G, V)
  int64_t group_start = 0, group_fill = 0;
  bool group_live = false;         // some chunk of the group was not skipped
  std::vector<Tensor> dw_blocks;   // (rows, H) each, in the loss dtype
  int64_t block_rows = v;
  if (plan_.need_weight) {
    // A block's temporaries (product in cdt, its cast, the sum) stay within a quarter of the budget.
    const size_t block_row_bytes = static_cast<size_t>(h) * (itemsize(cdt) + 2 * itemsize(ldt));
    block_rows = static_cast<int64_t>(options_.memory_budget_bytes / 4 / std::max<size_t>(block_row_bytes, 1));
    block_rows = std::clamp<int64_t>(block_rows >= 64 ? block_rows / 64 * 64 : block_rows, 1, std::max<int64_t>(v, 1));
  }
  const auto flush_group = [&]() {
    if (group_fill > 0 && group_live) {
      const Tensor g = narrow(group, 0, 0, group_fill);         // (G, V)
      const Tensor hg = narrow(x, 0, group_start, group_fill);  // (G, H)
      size_t bi = 0;
      for (int64_t r = 0; r < v; r += block_rows, ++bi) {
        const int64_t rows = std::min(block_rows, v - r);
        Tensor part = cast(matmul(transpose(narrow(g, 1, r, rows), 0, 1), hg), ldt);  // (rows, H)
        if (bi == dw_blocks.size()) dw_blocks.push_back(part);
        else dw_blocks[bi] = add(dw_blocks[bi], part);
      }
      // the last read of hg: may overwrite it
      if (plan_.need_hidden) copy_(narrow(dh, 0, group_start, group_fill), matmul(g, weight));
    } else if (group_fill > 0 && plan_.need_hidden) {
      fill_(narrow(dh, 0, group_start, group_fill), 0.0);
    }
    group_start += group_fill;
    group_fill = 0;
    group_live = false;
  };

  // logits (n, V) in the loss dtype of chunk ci; the compute-dtype product is freed by the cast.
  const auto chunk_logits = [&](int64_t ci) {
    const int64_t s = ci * chunk, n = std::min(chunk, n_tok - s);
    Tensor z = matmul(narrow(x, 0, s, n), wt);
    if (bias.defined()) z = add(z, bias);
    return cast(z, ldt);
  };
  const auto next_live = [&](int64_t ci) {  // the next chunk after ci with a non-ignored target
    for (++ci; ci < n_chunks && plan_.valid[static_cast<size_t>(ci)] == 0;) ++ci;
    return ci;
  };
  // Pipelining: the next chunk's logits are queued right after this chunk's loss forward, so the
  // GPU has a large product to run while the host walks the loss's backward (a loss that
  // synchronises, e.g. one calling the checked cross_entropy, does not stall the GPU then). The
  // ready-made losses use cross_entropy_unchecked: the targets were checked once on the host.
  Tensor prefetched;
  int64_t prefetched_ci = -1;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t s = ci * chunk, n = std::min(chunk, n_tok - s);
    if (plan_.need_weight && group_fill + n > group.size(0)) flush_group();
    if (plan_.valid[static_cast<size_t>(ci)] == 0) {  // every target ignored: no loss, no gradient
      if (plan_.need_weight) {
        fill_(narrow(group, 0, group_fill, n), 0.0);
        group_fill += n;
      } else if (plan_.need_hidden) {
        fill_(narrow(dh, 0, s, n), 0.0);
      }
      continue;
    }
    Tensor logits = prefetched_ci == ci ? std::move(prefetched) : chunk_logits(ci);  // (n, V)
    prefetched = Tensor();
    const auto prefetch = [&] {
      prefetched_ci = next_live(ci);
      if (prefetched_ci < n_chunks) prefetched = chunk_logits(prefetched_ci);
    };
    auto [chunk_sum, dlogits] = chunk_loss(logits, narrow(safe, 0, s, n), narrow(valid, 0, s, n), any_grad, k, prefetch);
    logits = Tensor();
    loss = add(loss, chunk_sum);
    if (!any_grad) continue;
    if (plan_.need_bias) db = add(db, sum(dlogits, {0}));
    if (plan_.need_weight) {
      copy_(narrow(group, 0, group_fill, n), dlogits);  // (n, V) rows, cast to the compute dtype
      group_fill += n;
      group_live = true;
    } else if (plan_.need_hidden) {
      Tensor dlc = cast(dlogits, cdt);  // (n, V)
      dlogits = Tensor();
      copy_(narrow(dh, 0, s, n), matmul(dlc, weight));
    }
  }
  loss = mul(loss, plan_.scale);

  Tensor dw;  // (V, H) in weight's dtype
  if (plan_.need_weight) {
    flush_group();
    group = Tensor();
    dw = empty({v, h}, weight.dtype(), dev);
    if (dw_blocks.empty()) fill_(dw, 0.0);
    for (size_t bi = 0; bi < dw_blocks.size(); ++bi) {
      const int64_t r = static_cast<int64_t>(bi) * block_rows;
      copy_(narrow(dw, 0, r, dw_blocks[bi].size(0)), dw_blocks[bi]);
      dw_blocks[bi] = Tensor();
    }
  }
  if (db.defined()) db = cast(db, bias.dtype());
  if (any_grad) save_for_backward({dh, dw, db});
  return {loss};
}

std::vector<Tensor> ChunkedLinearLossFunction::backward(const std::vector<Tensor>& grad_outputs) {
  const Tensor& g = grad_outputs[0];  // () upstream gradient of the loss
  KILN_CHECK(!scaled_, kOp,
             "a second backward through the same loss is not supported: the first scaled the stored gradients in "
             "place (no second copy of d(weight)); compute the loss again");
  scaled_ = true;
  const std::vector<Tensor>& st = saved();
  const std::vector<bool>& want = needs_input_grad();
  std::vector<Tensor> grads(want.size());
  const auto scaled = [&](const Tensor& t) {  // t *= g, in place
    std::vector<Tensor> out{t};
    dispatch_into(std::make_shared<const prim::Binary>(BinaryOp::mul), {t, cast(g, t.dtype())}, out);
    return t;
  };
  if (want[0] && st[0].defined()) grads[0] = reshape(scaled(st[0]), hidden_shape_);
  if (want.size() > 1 && want[1] && st[1].defined()) grads[1] = scaled(st[1]);
  if (want.size() > 2 && want[2] && st[2].defined()) grads[2] = scaled(st[2]);
  return grads;
}

}  // namespace

size_t chunked_loss_bytes_per_token(int64_t vocab, DType compute_dtype, bool fused_cross_entropy) {
  const size_t row = static_cast<size_t>(std::max<int64_t>(vocab, 1));
  if (fused_cross_entropy) return row * itemsize(compute_dtype);
  return row * (2 * itemsize(compute_dtype) + 3 * itemsize(loss_dtype_for(compute_dtype)));
}

int64_t chunked_loss_chunk_size(int64_t vocab, DType compute_dtype, size_t memory_budget_bytes, bool fused_cross_entropy) {
  const int64_t fit = static_cast<int64_t>(memory_budget_bytes /
                                           chunked_loss_bytes_per_token(vocab, compute_dtype, fused_cross_entropy));
  if (fit >= 64) return fit / 64 * 64;
  return std::max<int64_t>(fit, 1);
}

int64_t chunked_loss_group_size(int64_t vocab, DType compute_dtype, size_t memory_budget_bytes, int64_t chunk) {
  const size_t row = static_cast<size_t>(std::max<int64_t>(vocab, 1)) * itemsize(compute_dtype);
  const int64_t fit = static_cast<int64_t>(memory_budget_bytes / row);
  chunk = std::max<int64_t>(chunk, 1);
  return chunk * std::max<int64_t>(1, fit / chunk);
}

Tensor chunked_linear_loss(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const LossFn& loss_fn,
                           const ChunkedLossOptions& options) {
  KILN_CHECK(hidden.defined() && weight.defined() && targets.defined(), kOp, "hidden, weight and targets must be defined");
  KILN_CHECK(static_cast<bool>(loss_fn), kOp, "loss_fn is empty");
  KILN_CHECK(hidden.dim() >= 2, kOp, "hidden must be (N, H) or (..., H), found shape {}", shape_str(hidden.shape()));
  KILN_CHECK(weight.dim() == 2, kOp, "weight must be (V, H), found shape {}", shape_str(weight.shape()));
  KILN_CHECK(is_floating(hidden.dtype()), kOp, "hidden must be a float tensor, found {}", dtype_name(hidden.dtype()));
  KILN_CHECK(weight.dtype() == hidden.dtype(), kOp, "weight must have hidden's dtype {}, found {}",
             dtype_name(hidden.dtype()), dtype_name(weight.dtype()));
  const int64_t h = hidden.size(-1), v = weight.size(0);
  KILN_CHECK(weight.size(1) == h, kOp, "weight must be (V, {}) to match hidden {}, found {}", h,
             shape_str(hidden.shape()), shape_str(weight.shape()));
  KILN_CHECK(v > 0 && h > 0, kOp, "vocabulary and hidden sizes must be positive, found weight {}",
             shape_str(weight.shape()));
  KILN_CHECK(weight.device() == hidden.device(), kOp, "weight is on {}, hidden on {}", weight.device().str(),
             hidden.device().str());
  KILN_CHECK(targets.device() == hidden.device(), kOp, "targets are on {}, hidden on {}", targets.device().str(),
             hidden.device().str());
  KILN_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32, kOp, "targets must be i64 or i32, found {}",
             dtype_name(targets.dtype()));
  const Shape lead(hidden.shape().begin(), hidden.shape().end() - 1);
  const int64_t n_tok = numel(lead);
  KILN_CHECK(targets.shape() == lead || (targets.dim() == 1 && targets.size(0) == n_tok), kOp,
             "targets must be {} or ({},) to match hidden {}, found {}", shape_str(lead), n_tok,
             shape_str(hidden.shape()), shape_str(targets.shape()));
  const Tensor& bias = options.bias;
  if (bias.defined()) {
    KILN_CHECK(bias.dim() == 1 && bias.size(0) == v, kOp, "bias must be ({},), found {}", v, shape_str(bias.shape()));
    KILN_CHECK(bias.dtype() == hidden.dtype(), kOp, "bias must have hidden's dtype {}, found {}",
               dtype_name(hidden.dtype()), dtype_name(bias.dtype()));
    KILN_CHECK(bias.device() == hidden.device(), kOp, "bias is on {}, hidden on {}", bias.device().str(),
               hidden.device().str());
  }
  KILN_CHECK(options.chunk_size >= 0, kOp, "chunk_size must be >= 0 (0: automatic), found {}", options.chunk_size);
  KILN_CHECK(options.memory_budget_bytes > 0, kOp, "memory_budget_bytes must be positive");
  KILN_CHECK(options.reduction != Reduction::none, kOp, "reduction must be sum or mean, found none");

  ChunkPlan plan;
  const bool fused = loss_fn.target<CrossEntropyLossFn>() != nullptr;
  plan.chunk = options.chunk_size > 0 ? options.chunk_size
                                      : chunked_loss_chunk_size(v, hidden.dtype(), options.memory_budget_bytes, fused);
  plan.chunk = std::min(plan.chunk, std::max<int64_t>(n_tok, 1));
  plan.group = chunked_loss_group_size(v, hidden.dtype(), options.memory_budget_bytes, plan.chunk);
  const Tensor flat_targets = reshape(targets, {n_tok});  // (N)
  const std::vector<int64_t> host = cast(flat_targets, DType::i64).to_vector<int64_t>();
  int64_t total = 0;
  for (int64_t s = 0; s < n_tok; s += plan.chunk) {
    int64_t count = 0;
    for (int64_t i = s; i < std::min(n_tok, s + plan.chunk); ++i) {
      const int64_t t = host[static_cast<size_t>(i)];
      if (t == options.ignore_index) continue;
      KILN_CHECK(t >= 0 && t < v, kOp, "target {} of token {} is outside [0, {}) and is not ignore_index {}", t, i, v,
                 options.ignore_index);
      ++count;
    }
    plan.valid.push_back(count);
    total += count;
  }
  plan.scale = options.reduction == Reduction::sum ? 1.0 : (total > 0 ? 1.0 / static_cast<double>(total) : 0.0);
  const bool grad_on = autograd::grad_enabled();
  plan.need_hidden = grad_on && hidden.requires_grad();
  plan.need_weight = grad_on && weight.requires_grad();
  plan.need_bias = grad_on && bias.defined() && bias.requires_grad();
  plan.hidden_in_place = options.overwrite_hidden && plan.need_hidden && !hidden.is_leaf() && hidden.is_contiguous();

  std::vector<Tensor> inputs{hidden, weight};
  if (bias.defined()) inputs.push_back(bias);
  auto fn = std::make_shared<ChunkedLinearLossFunction>(flat_targets, loss_fn, options, std::move(plan));
  return autograd::apply(fn, inputs)[0];
}

// ---- ready-made losses

LossFn cross_entropy_loss(const CrossEntropyOptions& options) {
  KILN_CHECK(options.label_smoothing >= 0.0 && options.label_smoothing <= 1.0, "cross_entropy_loss",
             "label_smoothing must be in [0, 1], found {}", options.label_smoothing);
  return CrossEntropyLossFn{options.label_smoothing, options.z_loss_weight};
}

LossFn z_loss(double z_weight) {
  return [z_weight](const Tensor& logits, const Tensor&) { return mul(square(logsumexp(logits, {1})), z_weight); };
}

LossFn focal_loss(double gamma) {
  KILN_CHECK(gamma == 0.0 || gamma >= 1.0, "focal_loss", "gamma must be 0 or >= 1, found {}", gamma);
  return [gamma](const Tensor& logits, const Tensor& targets) {
    Tensor nll = cross_entropy_unchecked(logits, targets, -1, Reduction::none);  // (n) = -log p_t, valid targets
    if (gamma == 0.0) return nll;
    Tensor one_minus_pt = 1.0 - exp(neg(nll));                   // (n)
    return mul(pow(one_minus_pt, gamma), nll);
  };
}

}  // namespace kiln::nn

// Chunked linear + loss head: loss = reduce(loss_fn(hidden @ weight^T + bias, targets)) computed over
// chunks of tokens so the full (N, V) logits never exist, for any loss written with kiln ops, plus
// ready-made losses (cross-entropy with label smoothing, z-loss, focal loss).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

#include "core/ops.h"
#include "core/tensor.h"

namespace kiln::nn {

// The LossFn contract. loss_fn(logits, targets) gets one chunk of n tokens:
//   logits  (n, V) in the loss dtype (f32; f64 when the inputs are f64), a leaf of autograd;
//   targets (n) int, every entry a valid class in [0, V): ignored tokens are passed as class 0.
// It returns the per-token losses (n) (any float dtype; cast to the loss dtype), written with kiln
// ops. The head zeroes the losses of ignored tokens (targets == ignore_index), sums the chunk and
// scales it (1 for sum, 1 / #non-ignored tokens of the whole batch for mean), so sum and mean are
// exact across chunks whatever the chunk size. The gradient of the loss comes from autograd on the
// chunk; a loss never needs a hand-written derivative.
using LossFn = std::function<Tensor(const Tensor& logits, const Tensor& targets)>;

struct ChunkedLossOptions {
  Tensor bias;  // optional (V), the dtype and device of weight
  // How the per-token losses of the non-ignored tokens are combined: sum or mean (none is an error:
  // the head never holds every token's loss). Mean over zero tokens (every target ignored) is defined
  // as 0 with zero gradients (PyTorch gives NaN).
  Reduction reduction = Reduction::mean;
  int64_t ignore_index = -100;
  // Tokens per chunk; 0 chooses it from memory_budget_bytes (see chunked_loss_chunk_size). A size
  // above N is one chunk; sizes need not divide N.
  int64_t chunk_size = 0;
  // The extra memory of one chunk (its logits, their gradient, the loss's temporaries; estimated by
  // chunked_loss_bytes_per_token) beyond the inputs and gradients. With a trainable weight the
  // gradient group buffer takes as much again (see chunked_linear_loss). With the default 2 GiB,
  // bf16 and V = 128256: chunks of 1024 tokens, groups of 8192 (measured peaks and the time cost of
  // smaller budgets: bench/RESULTS.md, chunked loss head).
  size_t memory_budget_bytes = size_t{2} << 30;
  // The caller gives hidden up: nothing reads it after this call (a model's final hidden states,
  // passed on to the head alone). d(hidden) is then written over hidden, chunk by chunk once the
  // chunk's rows are read, instead of into a new (N, H) buffer: N x H fewer elements at the head's
  // peak. Applies when hidden is contiguous and computed by an op (a leaf keeps its values: a new
  // buffer then, as without the option). An op that saved hidden for its own backward finds it
  // changed: that backward stops with autograd's "modified in place" error, never a wrong gradient.
  bool overwrite_hidden = false;
};

// The estimated extra bytes per token of one chunk: the logits in the compute dtype, the logits in
// the loss dtype, their gradient, the loss's temporaries (softmax-sized: one more loss-dtype row)
// and the gradient cast back to the compute dtype: V * (2 * itemsize(compute) + 3 * itemsize(loss)).
// For bf16 and V = 128256 that is 2 MiB per token. With `fused_cross_entropy` (the built-in
// cross_entropy_loss, whose gradient is written over the logits): V * itemsize(compute), 250 KiB.
size_t chunked_loss_bytes_per_token(int64_t vocab, DType compute_dtype, bool fused_cross_entropy = false);
// The largest chunk whose estimate fits the budget, rounded down to a multiple of 64 when >= 64,
// and at least 1. With a 1 GiB budget, bf16 and V = 128256: 512 tokens (2 GiB: 1024); fused
// cross-entropy: 4160. The estimate covers the pipelining (the next chunk's logits exist while this
// chunk's gradient is taken; the fused path needs none).
int64_t chunked_loss_chunk_size(int64_t vocab, DType compute_dtype, size_t memory_budget_bytes,
                                bool fused_cross_entropy = false);
// Tokens per gradient group (trainable weight only): the largest multiple of `chunk` (at least one
// chunk) whose (G, V) buffer in the compute dtype fits the budget. 1 GiB, bf16, V = 128256, chunk
// 512: 4096.
int64_t chunked_loss_group_size(int64_t vocab, DType compute_dtype, size_t memory_budget_bytes, int64_t chunk);

// hidden (..., H) float, weight (V, H) of hidden's dtype and device, targets (...) int with the
// leading shape of hidden (or flat (N)). Returns the 0-d loss in the loss dtype (f32; f64 for f64
// inputs). Chunk by chunk: logits = hidden_chunk @ weight^T (+ bias) in the input dtype (f32
// accumulation), upcast to the loss dtype, then loss_fn. Targets are checked on the host (one copy,
// a sync): each must be in [0, V) or equal ignore_index; chunks whose targets are all ignored are
// skipped (zero loss, zero gradient).
//
// Autograd strategy (a custom autograd::Function, no logits recomputation): when grad mode is on
// and an input requires grad, the forward pass runs loss_fn with autograd enabled on each chunk's
// logits made an autograd leaf, and takes d(loss)/d(logits) (n, V) at once (the loss's
// gradient, from autograd); d(bias) += its column sums (f32). Frozen weight: d(hidden) rows =
// dlogits (cast to the compute dtype) @ weight per chunk, and no weight-gradient work at all.
// Trainable weight: the dlogits rows are collected into a group buffer of chunked_loss_group_size
// tokens; per group, d(hidden) rows = group @ weight and d(weight) += group^T @ hidden_group,
// accumulated in f32 by row blocks (one f32 accumulation pass per group, not per chunk) and cast
// to weight's dtype at the end. d(hidden) is kept (N, H) in hidden's dtype. Backward multiplies the
// stored gradients by the upstream scalar. The next chunk's logits product is queued before this
// chunk's loss backward (pipelining: a user's loss may synchronise). Targets are checked once on the
// host, so the ready-made losses use cross_entropy_unchecked (no per-chunk stream sync). Extra
// peak memory ~ the budget (frozen), ~ 2x the budget + the f32 d(weight) accumulator V * H * 4 +
// d(weight) (trainable), plus d(hidden).
//
// The built-in cross_entropy_loss (with gradients wanted) takes a fused path instead: per chunk, the
// logits product in the compute dtype, then one kernel (cross_entropy_loss_grad_) writes each row's
// loss and, over the logits themselves, its scaled gradient — no f32 copy, no second (n, V) buffer, no
// autograd and no host synchronisation; d(hidden) rows and d(weight) come from GEMMs written straight
// into their buffers, d(weight) accumulating chunk by chunk in weight's dtype through the GEMM's
// addend (f32 inside the GEMM, one rounding per chunk, as PyTorch and Liger do for a bf16 weight).
// Extra peak memory: one chunk of logits + d(hidden) (frozen), + d(weight) (trainable); d(hidden) takes
// no memory of its own with overwrite_hidden.
// Either path: backward scales the stored gradients by the upstream gradient in place, so a second
// backward through the same loss (retain_graph) is refused with a clear error.
Tensor chunked_linear_loss(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const LossFn& loss_fn,
                           const ChunkedLossOptions& options = {});

// ---- ready-made losses (per-token, written with kiln ops; see the LossFn contract)

struct CrossEntropyOptions {
  // torch.nn.functional.cross_entropy's label_smoothing: the target distribution is
  // (1 - s) * onehot + s / V, so loss = (1 - s) * nll + s * (logsumexp - mean(logits)).
  double label_smoothing = 0.0;
  // PaLM's auxiliary z-loss added to each token: z_loss_weight * logsumexp(logits)^2.
  double z_loss_weight = 0.0;
};
// Cross-entropy (kiln's fused cross_entropy op for the nll part). With chunked_linear_loss's
// ignore_index and mean reduction this matches torch.nn.functional.cross_entropy(logits, targets,
// ignore_index=..., label_smoothing=...) (plus the z-loss term when its weight is not 0).
LossFn cross_entropy_loss(const CrossEntropyOptions& options = {});
// z_weight * logsumexp(logits)^2 alone (PaLM).
LossFn z_loss(double z_weight);
// Focal loss (Lin et al.): (1 - p_t)^gamma * -log(p_t) with p_t the target's softmax probability;
// gamma = 0 is cross-entropy. gamma must be 0 or >= 1 (a smaller positive power has an unbounded
// derivative at p_t = 1).
LossFn focal_loss(double gamma);

}  // namespace kiln::nn

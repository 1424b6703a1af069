// The memory-budget planner (issue 15): for a Llama about to train on (B, T) batches it measures
// what one decoder layer keeps for backward and needs while it runs, on the device, and chooses
// which layers to checkpoint (and whether their inputs wait in host memory) and the loss head's
// chunk size: the fastest plan whose predicted peak fits a budget in bytes. plan_memory() measures and chooses; MemoryPlan::apply() sets the model.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/device.h"
#include "nn/llama.h"

namespace kiln::nn {

struct MemoryPlanOptions {
  int64_t batch_size = 1;  // B
  int64_t seq_len = 0;     // T
  // The most the device may hold at the peak of a training step (memory_usage's allocated bytes,
  // the model included); 0: default_memory_budget(device).
  size_t budget_bytes = 0;
  // Optimizer state still to be allocated by its first step: Optimizer::pending_state_bytes().
  size_t optimizer_state_bytes = 0;
  // The most pinned host memory offloaded layers may take; 0: half of the host's free memory.
  size_t host_budget_bytes = 0;
  // The probe runs one decoder layer on one sequence of min(T, probe_tokens) tokens and one of
  // half as many, and fits bytes = fixed + per_token * tokens through the two. With a
  // sequence-chunked MLP (Llama::set_mlp_chunk) shorter than T, both lengths exceed the chunk: up to
  // 4 chunks and half of that. The peak of a layer's backward is the largest of several moments, and
  // at short lengths one with a fixed part (a dequantised weight) can lead where at T a per-token one
  // does (the MLP's three (T, intermediate) gradients): probes of 128 and 256 tokens put a tiny
  // Llama's backward at 3.1 MiB for 2048 tokens, where it takes 5.5 MiB. Longer probes see the moment T will.
  int64_t probe_tokens = 1024;
  // When no plan fits with whole MLPs, the model has no MLP pieces and T is at least twice this: the
  // plan tries the MLPs in pieces of this many tokens (0: never).
  int64_t mlp_chunk_when_needed = 8192;
  // When nothing fits even so, the plan puts every layer in segments (LayerActivations::segment: two
  // more forwards of every layer), the least memory of those, with the segments' inputs in host memory
  // as the host budget allows.
  bool segments_when_needed = true;
};

// bytes = fixed + per_token * tokens, fitted through two probe lengths.
struct BytesPerToken {
  double fixed = 0;
  double per_token = 0;
  size_t at(int64_t tokens) const;
};

// What a block needs, measured by running it forward and backward on a (1, t, hidden) input that
// needs a gradient: bytes above that input.
struct BlockMemory {
  BytesPerToken saved;           // allocated after forward with grad on (the output included)
  BytesPerToken held;            // of that, what is left once the output is freed (before backward)
  BytesPerToken forward_peak;    // the most allocated during forward
  BytesPerToken backward_extra;  // the most allocated during backward above what forward left (less the
                                 // output) plus the incoming gradient (the block's parameter gradients
                                 // included; when checkpointed, the recomputed forward too)
};

// The probe's measurements (plan_memory): one decoder layer kept whole and checkpointed, and the
// final RMSNorm.
struct LayerMemory {
  BlockMemory kept, checkpointed, norm;
};

// The chosen plan and its prediction. Predicted peak = static + dequantised weights + gradients +
// optimizer + batch + activations + peak_extra; every part is in bytes.
struct MemoryPlan {
  Device device;
  int64_t batch_size = 0, seq_len = 0;
  size_t budget_bytes = 0;
  // Per decoder layer: kept whole, checkpointed (only its input is kept; its forward runs again in
  // backward) or offloaded (checkpointed, its input, attention output and LSE in pinned host memory: on a
  // GPU, within MemoryPlanOptions::host_budget_bytes; preferred to checkpointing on the device, as its
  // recompute skips attention), and of those the lowest with q, k, v and the residual stream after
  // attention on the host too (LayerActivations::offload_qkv: its recompute also skips the q, k, v and o
  // GEMMs, for more host memory and the device memory its prefetch takes). The lowest layers are
  // checkpointed first (the top ones' activations are used first), the lowest of those offloaded. When
  // nothing of that fits: every layer in segments of segment_layers, each segment's first layer
  // checkpointed or offloaded (its input only), the others LayerActivations::segment.
  std::vector<LayerActivations> layer_activations;
  int64_t mlp_chunk = 0;             // Llama::set_mlp_chunk: the model's, or chosen when nothing fits whole
  int64_t segment_layers = 0;        // layers a segment spans when every layer is in segments, else 0
  int64_t loss_chunk = 0;            // tokens per chunk of the loss head
  // Decoder layers whose NF4 weights stay dequantised (Llama::set_dequantized_layers): what budget is
  // left once the activations and the loss chunk are chosen, one layer's dense weights at a time.
  int64_t dequantized_layers = 0;
  size_t loss_memory_budget = 0;     // Llama::set_loss_memory_budget value giving loss_chunk

  size_t static_bytes = 0;       // allocated on the device when planned: weights, caches, other tensors
  size_t gradient_bytes = 0;     // gradients of trainable parameters not allocated yet
  size_t optimizer_bytes = 0;    // optimizer state not allocated yet
  size_t batch_bytes = 0;        // the (B, T) input ids and labels (i64)
  size_t activation_bytes = 0;   // kept for backward when forward ends: embeddings, each layer's saved
                                 // tensors (checkpointed: its output only), the final norm's
  size_t peak_extra_bytes = 0;   // on top at the peak (see peak_at)
  std::string peak_at;           // "the loss head", "the final norm's backward", "layer N's backward", ...
  size_t predicted_peak_bytes = 0;
  size_t minimum_budget_bytes = 0;  // the least any plan needs (normally every layer checkpointed, the
                                    // smallest loss chunk)
  size_t layer_input_bytes = 0;     // one (B, T, hidden) activation: what a checkpointed layer keeps
  size_t host_bytes = 0;            // pinned host memory the offloaded layers take (inputs, attention outputs
                                    // and LSE; q, k, v and the residual stream of offload_qkv layers)
  size_t dequantized_bytes = 0;     // the dequantised weights of those layers (in the predicted peak)
  LayerMemory layer;                // the probe's measurements

  int64_t num_checkpointed() const;  // offloaded layers included
  // A few lines for a person: the budget, the layers checkpointed, the chunk, the predicted peak
  // and its parts.
  std::string describe() const;
  // Sets the model's per-layer activations, MLP pieces, dequantised layers and loss head budget to this plan.
  void apply(Llama& model) const;
};

// The smallest loss chunk a plan uses (fewer tokens make the head's GEMMs inefficient), or every
// token when there are fewer.
inline constexpr int64_t kMinLossChunk = 256;


// Measures and chooses (see the file comment): as many layers kept whole as fit, then the largest
// loss chunk up to the default loss budget (ChunkedLossOptions' 2 GiB), then as many layers with their
// NF4 weights kept dequantised as the rest of the budget holds; when nothing fits and the
// model's MLPs are whole, the same with the MLPs in pieces (MemoryPlanOptions::mlp_chunk_when_needed). The measurements run the top
// decoder layer (kept whole and checkpointed) and the final norm forward and backward on the model's
// device, in the model's training mode (call model.train() first, as training does), and take every
// layer to be like the top one. The model stays as it was (its gradients, the default generator). A
// budget that no plan fits with the smallest chunk is a kiln::Error naming the smallest budget that
// fits and what to lower. The model must be on one device, without forward hooks that communicate
// (fully_shard's): the probe runs on one process alone.
MemoryPlan plan_memory(Llama& model, const MemoryPlanOptions& options);

// A budget when the user gives none: what kiln holds on `device` now plus free_memory(device), less
// a margin of 5% or 1 GiB, whichever is more (fragmentation, library workspaces); 0 when the margin
// takes everything.
size_t default_memory_budget(Device device);

// "1.50 GiB", "12.3 MiB", "512 B": how the plan prints bytes.
std::string format_bytes(double bytes);

}  // namespace kiln::nn

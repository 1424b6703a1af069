// `kiln finetune`'s memory check before anything large is allocated: an estimate of what one training
// step holds (weights, the activations kept for backward, the logits) against what the machine has, so
// an impossible --batch-size is a clear error instead of the kernel's OOM killer.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "core/dtype.h"
#include "examples/kiln/finetune_config.h"
#include "nn/llama.h"

namespace kiln::app {

// Bytes, a deliberately low estimate (what one micro-batch cannot do without), so that the check only
// refuses runs that surely do not fit.
struct StepMemory {
  double weights = 0;      // the base (NF4: half a byte per linear weight) and the embeddings
  double activations = 0;  // kept for backward: every layer's (or, with checkpointing, each layer's input
                           // plus one layer's) per-token tensors, and one layer's attention scores
  double logits = 0;       // the f32 logits and their gradient (one chunk of tokens with the chunked head)
  double total() const { return weights + activations + logits; }
};
StepMemory estimate_step_memory(const nn::LlamaConfig& model, const FinetuneConfig& c, DType dtype);

// MemAvailable of /proc/meminfo in bytes; nullopt where it cannot be read (not Linux).
std::optional<double> available_host_memory();

// kiln::Error "[finetune] one training step needs about X GiB (...), more than the Y GiB this machine has
// available (MemAvailable in /proc/meminfo): lower --batch-size ..." when the estimate exceeds `available`.
void check_step_fits(const nn::LlamaConfig& model, const FinetuneConfig& c, DType dtype, double available);

// What to change when a GPU ran out of memory during `kiln finetune` (printed after the allocator's
// error, which says how much was asked for and how much the GPU had).
std::string gpu_memory_advice();

}  // namespace kiln::app

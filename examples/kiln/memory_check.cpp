// The step-memory estimate and the check against /proc/meminfo (see memory_check.h).
#include "examples/kiln/memory_check.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/memory.h"

namespace kiln::app {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

}  // namespace

StepMemory estimate_step_memory(const nn::LlamaConfig& m, const FinetuneConfig& c, DType dtype) {
  const double e = static_cast<double>(itemsize(dtype));
  const double h = static_cast<double>(m.hidden_size), inter = static_cast<double>(m.intermediate_size);
  const double layers = static_cast<double>(m.num_hidden_layers), vocab = static_cast<double>(m.vocab_size);
  const double kv = static_cast<double>(m.num_key_value_heads * m.head_dim);
  const double tokens = static_cast<double>(c.batch_size) * static_cast<double>(c.seq_len);
  StepMemory s;
  const double embeddings = vocab * h * (m.tie_word_embeddings ? 1 : 2);
  const double linears = static_cast<double>(m.num_parameters()) - embeddings;
  s.weights = embeddings * e + linears * (c.base == "nf4" ? 0.5 : e);
  // Per token and layer, kept for backward: the two norms' outputs, q, k, v, the attention output and
  // the o_proj output (~5h + 2kv), gate, up, silu(gate) and their product (4 x intermediate).
  const double per_token_layer = (5 * h + 2 * kv + 4 * inter) * e;
  // Checkpointed: every block's input, or in segments of g one input per segment and g at once in backward.
  const double g = static_cast<double>(c.segment_layers);
  const double inputs = c.segment_layers > 0 ? std::ceil(layers / g) + g - 1 : layers;
  s.activations = c.checkpointing ? tokens * h * e * inputs + tokens * per_token_layer
                                  : tokens * per_token_layer * layers;
  // One layer's attention scores (B, heads, T, T).
  s.activations += static_cast<double>(c.batch_size) * static_cast<double>(m.num_attention_heads) *
                   static_cast<double>(c.seq_len) * static_cast<double>(c.seq_len) * e;
  // f32 logits and their gradient: all of them without the chunked head, else at least one chunk's.
  const double logit_tokens = c.chunked_head ? std::min(tokens, 256.0) : tokens;
  s.logits = 2 * logit_tokens * vocab * 4;
  return s;
}

std::optional<double> available_host_memory() {
  try {
    return static_cast<double>(free_memory(kCPU));  // MemAvailable
  } catch (const Error&) {
    return std::nullopt;
  }
}

void check_step_fits(const nn::LlamaConfig& model, const FinetuneConfig& c, DType dtype, double available) {
  const StepMemory s = estimate_step_memory(model, c, dtype);
  if (s.total() <= available) return;
  std::string advice = "lower --batch-size (raise --grad-accum to keep the tokens per step) or --seq-len";
  if (!c.checkpointing) advice += ", or add --checkpointing";
  if (!c.chunked_head) advice += ", or use the chunked head (--chunked-head true)";
  KILN_FAIL("finetune",
            "one training step needs about {:.1f} GiB ({:.1f} GiB of weights, {:.1f} GiB of activations for --batch-size {} "
            "x --seq-len {} tokens, {:.1f} GiB of logits), more than the {:.1f} GiB this machine has available "
            "(MemAvailable in /proc/meminfo): {}",
            s.total() / kGiB, s.weights / kGiB, s.activations / kGiB, c.batch_size, c.seq_len, s.logits / kGiB,
            available / kGiB, advice);
}

std::string gpu_memory_advice() {
  return "the GPU ran out of memory (above: the request and what the GPU had): lower --seq-len or --batch-size "
         "(raise --grad-accum to keep the tokens per step), add --checkpointing, keep the chunked head on "
         "(--chunked-head), or train on an NF4 base (--base nf4)";
}

}  // namespace kiln::app

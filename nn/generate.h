// Text generation for Llama: sampling from the last position's logits (greedy, temperature, top-k,
// top-p nucleus) with a kiln Generator, and the generation loop over a KV cache (the prompt is
// prefilled in one forward, then one token per step).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/random.h"
#include "nn/llama.h"

namespace kiln::nn {

struct GenerateOptions {
  int64_t max_new_tokens = 256;
  double temperature = 0.0;  // 0: greedy argmax (first maximum)
  double top_p = 1.0;        // nucleus: the smallest set of most likely tokens with mass >= top_p
  int64_t top_k = 0;         // 0: off; else only the k most likely tokens are candidates
  uint64_t seed = 0;         // the Philox seed of the sampling draws
  std::vector<int64_t> stop_tokens;  // generation ends after emitting one of these
  // > 0: only ids below this are drawn (a tokenizer smaller than the model's vocabulary, as when a
  // random-weight 8B model is paired with kiln's 4,096-id default tokenizer).
  int64_t token_limit = 0;
};

// The tokens a sampler may draw from `logits` (V) under `o` (temperature > 0), most likely first,
// with their renormalised probabilities. Ties keep the lower id first.
struct Candidates {
  std::vector<int64_t> ids;
  std::vector<double> probs;
};
Candidates sampling_candidates(const std::vector<float>& logits, const GenerateOptions& o);

// One token from `logits` (V): argmax when o.temperature <= 0, else a draw from the candidates
// with one U[0,1) number from `gen`.
int64_t sample_token(const std::vector<float>& logits, const GenerateOptions& o, Generator& gen);

// Continues `prompt` (ids, bos included if wanted) on the model's device with a KV cache of
// prompt + max_new_tokens positions, in eval mode without gradients (the training mode is restored).
// Returns the new tokens; a stop token that ended generation is the last of them. `on_token` sees
// each new token as it is drawn and stops generation (after that token) by returning false.
std::vector<int64_t> generate(Llama& model, const std::vector<int64_t>& prompt, const GenerateOptions& o,
                              const std::function<bool(int64_t token)>& on_token = {});

}  // namespace kiln::nn

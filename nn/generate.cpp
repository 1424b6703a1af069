// Sampling (greedy, temperature, top-k, top-p) over host f32 logits and the KV-cached generation loop.
#include "nn/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "autograd/grad_mode.h"
#include "core/error.h"
#include "core/ops.h"

namespace kiln::nn {

namespace {

void check_options(const GenerateOptions& o) {
  KILN_CHECK(o.max_new_tokens >= 0, "generate", "max_new_tokens must be >= 0, found {}", o.max_new_tokens);
  KILN_CHECK(std::isfinite(o.temperature) && o.temperature >= 0, "generate", "temperature must be >= 0, found {}",
             o.temperature);
  KILN_CHECK(o.top_p >= 0 && o.top_p <= 1, "generate", "top_p must lie in [0, 1], found {}", o.top_p);
  KILN_CHECK(o.top_k >= 0, "generate", "top_k must be >= 0 (0: off), found {}", o.top_k);
}

void check_logits(const std::vector<float>& logits) {
  KILN_CHECK(!logits.empty(), "generate", "expected logits over a vocabulary, found none");
  for (float v : logits) KILN_CHECK(!std::isnan(v), "generate", "the logits contain NaN");
}

// The first maximum.
int64_t host_argmax(const std::vector<float>& logits) {
  return std::max_element(logits.begin(), logits.end()) - logits.begin();
}

// One U[0,1) draw from the Philox stream of `gen`.
double uniform(Generator& gen) { return rand({1}, DType::f64, kCPU, &gen).item<double>(); }

// Restores a module's training mode on scope exit.
class TrainingModeRestore {
 public:
  explicit TrainingModeRestore(Module& m) : module_(m), was_training_(m.is_training()) {}
  ~TrainingModeRestore() { module_.train(was_training_); }
  TrainingModeRestore(const TrainingModeRestore&) = delete;
  TrainingModeRestore& operator=(const TrainingModeRestore&) = delete;

 private:
  Module& module_;
  bool was_training_;
};

}  // namespace

Candidates sampling_candidates(const std::vector<float>& logits, const GenerateOptions& o) {
  check_options(o);
  check_logits(logits);
  KILN_CHECK(o.temperature > 0, "generate", "sampling needs temperature > 0, found {}", o.temperature);
  const int64_t v = static_cast<int64_t>(logits.size());
  const int64_t k = o.top_k > 0 ? std::min(o.top_k, v) : v;
  std::vector<int64_t> order(static_cast<size_t>(v));  // (V) ids, most likely first after the sort
  std::iota(order.begin(), order.end(), int64_t{0});
  auto more_likely = [&](int64_t a, int64_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), more_likely);
  order.resize(static_cast<size_t>(k));

  // softmax(logits / T) over the k candidates, in f64
  const double top = logits[static_cast<size_t>(order[0])];
  std::vector<double> probs(order.size());
  double z = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp((static_cast<double>(logits[static_cast<size_t>(order[i])]) - top) / o.temperature);
    z += probs[i];
  }
  for (double& p : probs) p /= z;

  // nucleus: the smallest prefix whose mass reaches top_p (at least one token)
  if (o.top_p < 1) {
    size_t n = 0;
    double mass = 0;
    while (n < probs.size()) {
      mass += probs[n++];
      if (mass >= o.top_p) break;
    }
    order.resize(n);
    probs.resize(n);
    for (double& p : probs) p /= mass;
  }
  return {std::move(order), std::move(probs)};
}

int64_t sample_token(const std::vector<float>& logits, const GenerateOptions& o, Generator& gen) {
  check_options(o);
  check_logits(logits);
  if (o.temperature <= 0) return host_argmax(logits);
  const double u = uniform(gen);
  if (o.top_p >= 1 && o.top_k == 0) {
    // plain temperature sampling: no sort needed, walk the ids in order
    const double top = logits[static_cast<size_t>(host_argmax(logits))];
    std::vector<double> w(logits.size());  // (V) unnormalised probabilities
    double z = 0;
    for (size_t i = 0; i < logits.size(); ++i) z += w[i] = std::exp((static_cast<double>(logits[i]) - top) / o.temperature);
    double mass = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      mass += w[i] / z;
      if (u < mass && w[i] > 0) return static_cast<int64_t>(i);
    }
    for (size_t i = w.size(); i-- > 0;)
      if (w[i] > 0) return static_cast<int64_t>(i);  // rounding left u above the total mass
  }
  const Candidates c = sampling_candidates(logits, o);
  double mass = 0;
  for (size_t i = 0; i < c.ids.size(); ++i) {
    mass += c.probs[i];
    if (u < mass) return c.ids[i];
  }
  return c.ids.back();
}

std::vector<int64_t> generate(Llama& model, const std::vector<int64_t>& prompt, const GenerateOptions& o,
                              const std::function<bool(int64_t token)>& on_token) {
  check_options(o);
  const int64_t vocab = model.config().vocab_size;
  KILN_CHECK(!prompt.empty(), "generate", "the prompt is empty (give at least one token, e.g. bos)");
  for (int64_t id : prompt)
    KILN_CHECK(id >= 0 && id < vocab, "generate", "prompt token {} is outside the vocabulary [0, {})", id, vocab);
  if (o.max_new_tokens == 0) return {};

  TrainingModeRestore restore(model);
  model.eval();
  autograd::NoGradGuard no_grad;
  const Device device = model.lm_head_weight().device();
  const int64_t p = static_cast<int64_t>(prompt.size());
  // the last drawn token is never fed back, so prompt + max_new_tokens - 1 positions suffice
  KVCache cache = model.make_cache(1, p + o.max_new_tokens - 1);
  Generator gen(o.seed);

  Tensor h = model(from_vector<int64_t>(prompt, {1, p}, device), 0, &cache);  // (1, P, hidden)
  std::vector<int64_t> out;
  for (;;) {
    Tensor last = narrow(h, 1, h.size(1) - 1, 1);                                    // (1, 1, hidden)
    Tensor logits = reshape(cast(model.logits(last), DType::f32), {vocab});          // (V)
    if (o.token_limit > 0 && o.token_limit < vocab) logits = narrow(logits, 0, 0, o.token_limit);  // (limit)
    const int64_t token = o.temperature <= 0 ? argmax(logits, 0).item<int64_t>()
                                             : sample_token(logits.to_vector<float>(), o, gen);
    out.push_back(token);
    const bool go_on = !on_token || on_token(token);
    const bool stop = std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end();
    if (!go_on || stop || static_cast<int64_t>(out.size()) == o.max_new_tokens) break;
    h = model(from_vector<int64_t>({token}, {1, 1}, device), cache.length, &cache);  // (1, 1, hidden)
  }
  return out;
}

}  // namespace kiln::nn

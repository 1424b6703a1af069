// plan_memory: the probe of one decoder layer (and the final norm) through memory_usage, the peak
// model of a training step built from it, and the choice of checkpointed layers and loss chunk.
#include "nn/memory_plan.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>

#include "autograd/checkpoint.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "core/memory.h"
#include "core/ops.h"
#include "core/random.h"

namespace kiln::nn {

namespace {

constexpr const char* kOp = "memory plan";
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// One run of `f` on a (1, t, hidden) input that needs a gradient: bytes above the input (BlockMemory).
struct ProbeRun {
  double saved = 0, held = 0, forward_peak = 0, backward_extra = 0;
};

ProbeRun probe_once(const std::function<Tensor(const Tensor&)>& f, int64_t t, int64_t hidden, DType dtype,
                    Device device, Generator& gen) {
  autograd::EnableGradGuard grad_on;
  Tensor x = randn({1, t, hidden}, dtype, device, &gen);  // (1, t, hidden)
  x.set_requires_grad(true);
  ProbeRun r;
  const size_t base = memory_usage(device).allocated;
  reset_peak_memory(device);
  Tensor y = f(x);  // (1, t, hidden)
  const MemoryUsage after = memory_usage(device);
  r.saved = static_cast<double>(after.allocated) - static_cast<double>(base);
  r.forward_peak = static_cast<double>(after.peak) - static_cast<double>(base);
  // In a step the output is freed before the block's backward (the block above, which kept it as its
  // input, is done): backward runs from a root without its data.
  y = autograd::without_data(y);
  r.held = static_cast<double>(memory_usage(device).allocated) - static_cast<double>(base);
  Tensor dy = randn(y.shape(), y.dtype(), device, &gen);  // (1, t, hidden) the incoming gradient
  const size_t before_backward = memory_usage(device).allocated;
  reset_peak_memory(device);
  autograd::backward({y}, {dy});
  r.backward_extra = static_cast<double>(memory_usage(device).peak) - static_cast<double>(before_backward);
  return r;
}

// Fits bytes = fixed + per_token * tokens through (t1, v1) and (t2, v2), t1 < t2; a negative slope
// or intercept (allocator noise) falls back to the larger per-token ratio.
BytesPerToken fit(int64_t t1, double v1, int64_t t2, double v2) {
  const double r1 = v1 / static_cast<double>(t1), r2 = v2 / static_cast<double>(t2);
  if (t1 == t2) return {0.0, std::max(r2, 0.0)};
  const double slope = (v2 - v1) / static_cast<double>(t2 - t1);
  const double fixed = v1 - slope * static_cast<double>(t1);
  if (slope < 0 || fixed < 0) return {0.0, std::max({r1, r2, 0.0})};
  return {fixed, slope};
}

// Runs `f` at t1 and at t2 tokens, t1 <= t2 (after a first run that warms up lazily built state)
// and fits each measurement. Before each run, and after the last, the gradients of `owner`'s
// parameters are put back as they were, so each run allocates them as a step's backward does.
BlockMemory probe(const std::function<Tensor(const Tensor&)>& f, Module& owner, int64_t t1, int64_t t2, int64_t hidden,
                  DType dtype, Device device) {
  std::vector<std::pair<Tensor, Tensor>> grads;  // (parameter, its gradient before the probe)
  for (auto& [name, p] : owner.named_parameters())
    if (p.requires_grad()) grads.emplace_back(p, p.grad());
  auto restore = [&grads] {
    for (auto& [p, g] : grads) g.defined() ? p.set_grad(g) : p.zero_grad();
  };
  Generator gen(0x6d656d706c616eULL);  // the probe's own numbers: the default generator is not touched
  std::vector<ProbeRun> runs;
  try {
    for (int64_t t : {t1, t1, t2}) {
      runs.push_back(probe_once(f, t, hidden, dtype, device, gen));
      restore();
    }
  } catch (...) {
    restore();
    throw;
  }
  const ProbeRun &a = runs[1], &b = runs[2];
  return {fit(t1, a.saved, t2, b.saved), fit(t1, a.held, t2, b.held), fit(t1, a.forward_peak, t2, b.forward_peak),
          fit(t1, a.backward_extra, t2, b.backward_extra)};
}

// The step's activations and its peak for one choice of checkpointed layers and loss chunk.
struct Prediction {
  size_t activations = 0, extra = 0;
  std::string at;
};

using Moments = std::vector<std::pair<size_t, std::string>>;  // (alive then, where)

// The prediction of a step that keeps `activations` when forward ends, whose peak is the largest moment.
Prediction peak_of(const Moments& moments, size_t activations) {
  const auto& peak = *std::max_element(moments.begin(), moments.end(),
                                       [](const auto& x, const auto& y) { return x.first < y.first; });
  Prediction p;
  p.activations = activations;
  p.extra = peak.first > activations ? peak.first - activations : 0;
  // 1.5% more for what the straight line through two probe lengths of one sequence misses at B x T
  // (allocations rounded at the probe's lengths): on an H100, a least-budget plan peaked 0.08% over a
  // prediction without it; on the CPU, a tiny Llama's checkpointed top layer's backward (B 2, T 256,
  // probed at 128 and 256 tokens) took 2% more than the fit.
  p.extra += (p.activations + p.extra) * 3 / 200;
  p.at = peak.second;
  return p;
}

struct StepModel {
  int64_t layers = 0, tokens = 0;
  size_t act_bytes = 0;    // one (B, T, hidden) activation
  size_t logit_bytes = 0;  // one token's logits (the fused cross-entropy's gradient is written over them)
  size_t offload_bytes = 0;  // what an offloaded layer keeps on the host: its input, attention output and LSE
  size_t qkv_bytes = 0;      // what an offload_qkv layer keeps there besides: q, k, v and the residual stream
  LayerMemory m;

  // The moments between the last layer's forward and its backward, with `below` alive beneath the final
  // norm: its forward, the loss head with one chunk of logits (and its per-row losses), its backward.
  // d(hidden) takes the memory of the norm's output (the Trainer's loss: ChunkedLossOptions::
  // overwrite_hidden), which is the incoming gradient of the norm's backward. Returns the activations
  // alive when forward ends.
  size_t add_head(Moments& moments, size_t below, int64_t chunk) const {
    moments.emplace_back(below + m.norm.forward_peak.at(tokens), "the final norm's forward");
    const size_t activations = below + m.norm.saved.at(tokens);
    moments.emplace_back(activations + static_cast<size_t>(chunk) * (logit_bytes + 16), "the loss head");
    moments.emplace_back(activations + m.norm.backward_extra.at(tokens), "the final norm's backward");
    return activations;
  }

  // The lowest `checkpointed` layers checkpointed, the lowest `offloaded` of them with their inputs in
  // host memory, the lowest `with_qkv` of those with q, k, v and the residual stream too. The peak is the
  // largest of the moments below: what is alive then, from the embeddings up.
  Prediction predict(int64_t checkpointed, int64_t chunk, int64_t offloaded_layers = 0, int64_t with_qkv = 0) const {
    auto block = [&](int64_t i) -> const BlockMemory& { return i < checkpointed ? m.checkpointed : m.kept; };
    auto offloaded = [&](int64_t i) { return i >= 0 && i < offloaded_layers; };
    // What layer i holds on the host (and brings back to the device before its backward).
    auto host = [&](int64_t i) -> size_t { return !offloaded(i) ? 0 : offload_bytes + (i < with_qkv ? qkv_bytes : 0); };
    auto name = [&](int64_t i, const char* what) {
      return fmt::format("layer {}'s {}{}", i, what,
                         i < with_qkv ? " (offloaded with q, k, v)" : offloaded(i) ? " (offloaded)" : i < checkpointed ? " (checkpointed)" : "");
    };
    Moments moments;
    // Forward: the embeddings (the first layer's input), then what each layer keeps. An offloaded
    // layer holds its attention output and LSE until its forward ends (then they are copied down
    // with its input, which leaves the device).
    size_t below = act_bytes;
    std::vector<size_t> prefix;  // prefix[i]: alive below layer i, its input included
    for (int64_t i = 0; i < layers; ++i) {
      prefix.push_back(below);
      moments.emplace_back(below + block(i).forward_peak.at(tokens) + (offloaded(i) ? host(i) - act_bytes : 0),
                           name(i, "forward"));
      below += block(i).saved.at(tokens);
      if (offloaded(i)) below -= act_bytes;
    }
    const size_t activations = add_head(moments, below, chunk);
    // Backward, top down: the layers above are freed, and with them the layer's output (the input they
    // kept): its other forward leftovers (held), its input (fetched back when offloaded, while the one
    // below's tensors are prefetched) and the gradient from above (an activation) are alive. An
    // offloaded layer's fetched attention output and LSE, and an offload_qkv layer's q, k, v and
    // residual stream, stand for what its recompute would have made (within backward_extra); the
    // prefetched ones of the layer below come on top. (Counting the output and the attention output
    // here put the prediction at T131072 on an H200 2.1 GiB, 10%, above the real peak.)
    for (int64_t i = layers - 1; i >= 0; --i)
      moments.emplace_back(prefix[static_cast<size_t>(i)] + (offloaded(i) ? host(i - 1) : 0) + block(i).held.at(tokens) +
                               act_bytes + block(i).backward_extra.at(tokens),
                           name(i, "backward"));
    return peak_of(moments, activations);
  }

  // Every layer in segments of `g` (LayerActivations::segment): segment j starts at layer j * g; the
  // lowest `offloaded` segments' inputs wait in host memory. A segment keeps its input (and its
  // output, the next one's input); its backward runs its layers forward again, each checkpointed
  // (keeping its input), then their backward top down, with the gradient from above alive throughout.
  Prediction predict_segments(int64_t g, int64_t chunk, int64_t offloaded) const {
    const BlockMemory& ck = m.checkpointed;
    const size_t act = act_bytes, fp = ck.forward_peak.at(tokens), saved = ck.saved.at(tokens),
                 bx = ck.backward_extra.at(tokens);
    const int64_t segments = (layers + g - 1) / g;
    auto size_of = [&](int64_t j) { return std::min(g, layers - j * g); };
    auto name = [&](int64_t j, const char* what) {
      return fmt::format("segment {} (layers {}-{}{})'s {}", j, j * g, j * g + size_of(j) - 1,
                         j < offloaded ? ", its input offloaded" : "", what);
    };
    Moments moments;
    size_t below = act;          // the embeddings: segment 0's input
    std::vector<size_t> prefix;  // prefix[j]: alive below segment j, its input included
    for (int64_t j = 0; j < segments; ++j) {
      prefix.push_back(below);
      // Layer after layer without grad: the segment's input, the previous layer's output, this one's forward.
      moments.emplace_back(below + (size_of(j) > 1 ? act : 0) + fp, name(j, "forward"));
      below += saved;
      if (j < offloaded) below -= act;
    }
    const size_t activations = add_head(moments, below, chunk);
    // Backward, top down: the segment's input (fetched back when offloaded, the one below's prefetched
    // meanwhile), its leftovers, the gradient from above, the inputs its recompute keeps for its layers
    // above the first, and the top one's backward (its own recompute included).
    for (int64_t j = segments - 1; j >= 0; --j) {
      const size_t prefetched = j > 0 && j < offloaded ? act : 0;  // the one below; prefix[j] counts its own input
      moments.emplace_back(prefix[static_cast<size_t>(j)] + prefetched + saved + act +
                               static_cast<size_t>(size_of(j) - 1) * act + std::max(bx, fp),
                           name(j, "backward"));
    }
    return peak_of(moments, activations);
  }
};

// "0-9, 12" for the layers whose choice `pick` takes, or "none".
std::string layer_ranges(const std::vector<LayerActivations>& layers, const std::function<bool(LayerActivations)>& pick) {
  std::string out;
  const int64_t n = static_cast<int64_t>(layers.size());
  for (int64_t i = 0; i < n;) {
    if (!pick(layers[static_cast<size_t>(i)])) {
      ++i;
      continue;
    }
    int64_t j = i;
    while (j + 1 < n && pick(layers[static_cast<size_t>(j + 1)])) ++j;
    if (!out.empty()) out += ", ";
    out += i == j ? std::to_string(i) : fmt::format("{}-{}", i, j);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}
std::string layer_ranges(const std::vector<LayerActivations>& layers, LayerActivations value) {
  return layer_ranges(layers, [value](LayerActivations a) { return a == value; });
}

}  // namespace

size_t BytesPerToken::at(int64_t tokens) const {
  const double v = fixed + per_token * static_cast<double>(tokens);
  return v > 0 ? static_cast<size_t>(std::ceil(v)) : 0;
}

std::string format_bytes(double bytes) {
  if (bytes >= kGiB) return fmt::format("{:.2f} GiB", bytes / kGiB);
  if (bytes >= 1024.0 * 1024.0) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024.0));
  if (bytes >= 1024.0) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{:.0f} B", bytes);
}

size_t default_memory_budget(Device device) {
  const size_t total = memory_usage(device).allocated + free_memory(device);
  const size_t margin = std::max<size_t>(total / 20, size_t{1} << 30);
  return total > margin ? total - margin : 0;
}

namespace {

// One plan with the model's MLP pieces as they are; when no plan fits, `no_fit` says why (and
// plan.minimum_budget_bytes the least that fits).
// Plans with every layer in segments (LayerActivations::segment) count in the least budget (with
// MemoryPlanOptions::segments_when_needed); with `segments`, the least of those is taken when no plan
// without them fits.
MemoryPlan plan_once(Llama& model, const MemoryPlanOptions& options, std::string& no_fit, bool segments) {
  const LlamaConfig& c = model.config();
  const int64_t b = options.batch_size, t = options.seq_len;
  KILN_CHECK(b >= 1 && t >= 1, kOp, "expected batch_size >= 1 and seq_len >= 1, found {} and {}", b, t);
  KILN_CHECK(options.probe_tokens >= 2, kOp, "expected probe_tokens >= 2, found {}", options.probe_tokens);
  const Tensor embed = model.model().child_as<Embedding>("embed_tokens").weight();
  const Device device = embed.device();
  const DType dtype = embed.dtype();
  for (const auto& [name, p] : model.named_parameters())
    KILN_CHECK(p.device() == device, kOp, "the model must be on one device: '{}' is on {}, the embeddings on {}", name,
               p.device().str(), device.str());
  KILN_CHECK(c.tie_word_embeddings || dynamic_cast<Linear*>(&model.child_as<LinearBase>("lm_head")), kOp,
             "the plan is for the chunked loss head, which needs a plain lm_head; found {}",
             model.child_as<LinearBase>("lm_head").type_name());

  MemoryPlan plan;
  plan.device = device;
  plan.batch_size = b;
  plan.seq_len = t;
  plan.budget_bytes = options.budget_bytes > 0 ? options.budget_bytes : default_memory_budget(device);
  const int64_t layers = c.num_hidden_layers, hidden = c.hidden_size, tokens = b * t;
  auto& top = model.model().child_as<ModuleList>("layers").at<LlamaDecoderLayer>(layers - 1);
  auto& norm = model.model().child_as<RMSNorm>("norm");

  // Warm-up at the full length (no grad): tables built lazily for T positions (RoPE) belong to the
  // static bytes, not to the probe.
  const GeneratorState rng = default_generator().state();
  {
    autograd::NoGradGuard no_grad;
    Generator gen(1);
    top(randn({1, t, hidden}, dtype, device, &gen));
  }
  // Measure.
  // Probe lengths: half of min(T, probe_tokens) and that. With a sequence-chunked MLP that T
  // exceeds, both are longer than the chunk (up to 4 chunks), so the probe sees pieces as T will.
  int64_t t2 = std::min(t, options.probe_tokens), t1 = std::max<int64_t>(1, t2 / 2);
  const int64_t mlp_chunk = model.mlp_chunk();
  if (mlp_chunk > 0 && t > mlp_chunk) {
    t2 = std::min(t, 4 * mlp_chunk);
    t1 = std::max(mlp_chunk + 1, t2 / 2);
  }
  try {
    plan.layer.kept = probe([&top](const Tensor& x) { return top(x); }, top, t1, t2, hidden, dtype, device);
    plan.layer.checkpointed = probe(
        [&top](const Tensor& x) {
          return autograd::checkpoint([&top](const std::vector<Tensor>& in) { return std::vector<Tensor>{top(in[0])}; },
                                      {x})[0];
        },
        top, t1, t2, hidden, dtype, device);
    plan.layer.norm = probe([&norm](const Tensor& x) { return norm(x); }, norm, t1, t2, hidden, dtype, device);
  } catch (...) {
    default_generator().set_state(rng);
    throw;
  }
  default_generator().set_state(rng);

  plan.static_bytes = memory_usage(device).allocated;
  for (const auto& [name, p] : model.named_parameters())
    if (p.requires_grad() && !p.grad().defined()) plan.gradient_bytes += static_cast<size_t>(p.numel()) * itemsize(p.dtype());
  plan.optimizer_bytes = options.optimizer_state_bytes;
  plan.batch_bytes = 2 * static_cast<size_t>(tokens) * itemsize(DType::i64);
  const size_t fixed = plan.static_bytes + plan.gradient_bytes + plan.optimizer_bytes + plan.batch_bytes;

  StepModel step;
  step.layers = layers;
  step.tokens = tokens;
  step.act_bytes = static_cast<size_t>(tokens * hidden) * itemsize(dtype);
  plan.layer_input_bytes = step.act_bytes;
  step.logit_bytes = chunked_loss_bytes_per_token(c.vocab_size, dtype, /*fused_cross_entropy=*/true);
  const size_t attention_bytes = static_cast<size_t>(tokens * c.num_attention_heads) *
                                 (static_cast<size_t>(c.head_dim) * itemsize(dtype) + itemsize(compute_dtype(dtype)));
  step.offload_bytes = step.act_bytes + attention_bytes;
  // What an offload_qkv layer also keeps (autograd::keep_for_recompute): q, k, v and the residual stream
  // after attention.
  step.qkv_bytes = static_cast<size_t>(tokens * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim) *
                       itemsize(dtype) + step.act_bytes;
  step.m = plan.layer;
  const int64_t min_chunk = std::min(tokens, kMinLossChunk);
  auto total = [&](const Prediction& p) { return fixed + p.activations + p.extra; };

  // Every split of the layers: the lowest `offloaded` checkpointed with their inputs in host memory (on
  // a GPU, within the host budget), the next ones checkpointed on the device, the rest
  // kept whole. Chosen: the fewest layers checkpointed that fit with the smallest chunk (a recomputed
  // layer costs its forward again), and of those splits the most offloaded (an offloaded layer keeps
  // its attention output: its recompute skips attention, and its copies overlap with compute; the 8B
  // at T4096 in 8 GiB on H100s: 16 of 30 offloaded ran 9,841 tok/s, all 30 9,932-10,022). Checkpointing more
  // layers normally lowers the peak, but not always (a checkpointed top layer recomputes at the peak),
  // so every split is tried.
  const size_t host_free =
      !device.is_cuda() ? 0 : options.host_budget_bytes > 0 ? options.host_budget_bytes : free_memory(kCPU) / 2;
  const int64_t max_offloaded = std::min<int64_t>(layers, static_cast<int64_t>(host_free / step.offload_bytes));
  // Of `o` offloaded layers, the most that can also keep q, k, v on the host.
  auto max_with_qkv = [&](int64_t o) {
    const size_t spare = host_free - static_cast<size_t>(o) * step.offload_bytes;
    return std::min<int64_t>(o, static_cast<int64_t>(spare / step.qkv_bytes));
  };
  struct Split {
    int64_t checkpointed = -1, offloaded = 0, with_qkv = 0;  // -1: none
  };
  Split chosen_split, least;
  size_t least_bytes = 0;
  for (int64_t k = 0; k <= layers; ++k) {
    for (int64_t o = std::min(k, max_offloaded); o >= 0; --o) {
      for (int64_t q = max_with_qkv(o); q >= 0; --q) {
        const size_t need = total(step.predict(k, min_chunk, o, q));
        if (least.checkpointed < 0 || need < least_bytes) {
          least = {k, o, q};
          least_bytes = need;
        }
        if (chosen_split.checkpointed < 0 && need <= plan.budget_bytes) chosen_split = {k, o, q};
      }
    }
  }
  // Segments of g layers, the lowest `offloaded` segments' inputs in host memory: every layer's
  // forward runs three times whatever g is, so the least of these.
  struct SegmentSplit {
    int64_t g = 0, offloaded = 0;  // g 0: none
  } seg;
  size_t seg_bytes = 0;
  if (options.segments_when_needed) {  // in the least budget always, taken only with `segments`
    const int64_t max_segments_offloaded = static_cast<int64_t>(host_free / step.act_bytes);
    for (int64_t g = 2; g <= layers; ++g) {
      for (int64_t o = std::min((layers + g - 1) / g, max_segments_offloaded); o >= 0; --o) {
        const size_t need = total(step.predict_segments(g, min_chunk, o));
        if (seg.g == 0 || need < seg_bytes) seg = {g, o}, seg_bytes = need;
      }
    }
  }
  const bool least_in_segments = seg.g > 0 && seg_bytes < least_bytes;
  const SegmentSplit least_seg = seg;
  if (!segments || chosen_split.checkpointed >= 0 || !least_in_segments || seg_bytes > plan.budget_bytes) seg = {};  // not taken
  const Prediction all = least_in_segments ? step.predict_segments(least_seg.g, min_chunk, least_seg.offloaded)
                                           : step.predict(least.checkpointed, min_chunk, least.offloaded, least.with_qkv);
  plan.minimum_budget_bytes = least_in_segments ? seg_bytes : least_bytes;
  plan.mlp_chunk = mlp_chunk;
  const int64_t checkpointed = chosen_split.checkpointed, offloaded = chosen_split.offloaded, with_qkv = chosen_split.with_qkv;
  if (checkpointed < 0 && seg.g == 0) {
    std::string least_plan;
    if (least_in_segments) {
      least_plan = fmt::format("every decoder layer in segments of {}", least_seg.g);
    } else {
      least_plan = fmt::format("{} of {} decoder layers checkpointed{}", least.checkpointed, layers,
                               least.offloaded == 0                    ? std::string()
                               : least.offloaded == least.checkpointed ? std::string(" with their inputs in host memory")
                                                                       : fmt::format(", {} with their inputs in host memory", least.offloaded));
    }
    no_fit = fmt::format(
              "a training step on batches of {} x {} tokens needs at least {} ({}, loss chunks of {} tokens): {} of model "
              "and other tensors, {} of gradients, {} of optimizer state, {} of activations, {} more at {}; the budget is "
              "{}. Lower the sequence length or the batch size (raise gradient accumulation to keep the tokens per step), "
              "train LoRA adapters on an NF4 base, or give a larger budget",
              b, t, format_bytes(static_cast<double>(plan.minimum_budget_bytes)), least_plan, min_chunk,
              format_bytes(static_cast<double>(plan.static_bytes)), format_bytes(static_cast<double>(plan.gradient_bytes)),
              format_bytes(static_cast<double>(plan.optimizer_bytes)), format_bytes(static_cast<double>(all.activations)),
              format_bytes(static_cast<double>(all.extra)), all.at, format_bytes(static_cast<double>(plan.budget_bytes)));
    return plan;
  }
  auto predict_chosen = [&](int64_t chunk) {
    return seg.g > 0 ? step.predict_segments(seg.g, chunk, seg.offloaded) : step.predict(checkpointed, chunk, offloaded, with_qkv);
  };

  // The largest chunk that fits, up to the default loss budget; loss_chunk is what the head will use.
  const size_t default_loss_budget = ChunkedLossOptions{}.memory_budget_bytes;
  size_t lo = static_cast<size_t>(min_chunk) * step.logit_bytes, hi = std::max(lo, default_loss_budget);
  auto chunk_of = [&](size_t loss_budget) {
    return std::min(tokens, chunked_loss_chunk_size(c.vocab_size, dtype, loss_budget, /*fused_cross_entropy=*/true));
  };
  while (lo < hi) {  // the largest loss budget whose chunk fits
    const size_t mid = lo + (hi - lo + 1) / 2;
    if (total(predict_chosen(chunk_of(mid))) <= plan.budget_bytes) lo = mid;
    else hi = mid - 1;
  }
  plan.loss_memory_budget = lo;
  plan.loss_chunk = chunk_of(lo);  // as chunked_linear_loss will choose it
  plan.layer_activations.assign(static_cast<size_t>(layers), LayerActivations::keep);
  if (seg.g > 0) {
    plan.segment_layers = seg.g;
    plan.layer_activations = in_segments(layers, seg.g, seg.offloaded);
    plan.host_bytes = static_cast<size_t>(seg.offloaded) * step.act_bytes;
  } else {
    for (int64_t i = 0; i < checkpointed; ++i)
      plan.layer_activations[static_cast<size_t>(i)] = i < with_qkv ? LayerActivations::offload_qkv
                                                       : i < offloaded ? LayerActivations::offload
                                                                       : LayerActivations::checkpoint;
    plan.host_bytes = static_cast<size_t>(offloaded) * step.offload_bytes + static_cast<size_t>(with_qkv) * step.qkv_bytes;
  }
  const Prediction chosen = predict_chosen(plan.loss_chunk);
  plan.activation_bytes = chosen.activations;
  plan.peak_extra_bytes = chosen.extra;
  plan.peak_at = chosen.at;
  plan.predicted_peak_bytes = total(chosen);
  // What is left holds dequantised NF4 weights, a layer at a time (each saves its dequantisations: after
  // the layers kept whole, the best use of memory).
  const size_t dense = model.dequantized_layer_bytes();
  if (dense > 0 && plan.predicted_peak_bytes < plan.budget_bytes) {
    plan.dequantized_layers = std::min<int64_t>(layers, static_cast<int64_t>((plan.budget_bytes - plan.predicted_peak_bytes) / dense));
    plan.dequantized_bytes = static_cast<size_t>(plan.dequantized_layers) * dense;
    plan.predicted_peak_bytes += plan.dequantized_bytes;
  }
  return plan;
}

}  // namespace

MemoryPlan plan_memory(Llama& model, const MemoryPlanOptions& options) {
  // Measured without dequantised weights (freed here, built again at the next forward after planning).
  const int64_t had_dense = model.dequantized_layers();
  model.set_dequantized_layers(0);
  struct Restore {
    Llama& m;
    int64_t n;
    ~Restore() { m.set_dequantized_layers(n); }
  } restore{model, had_dense};
  // When nothing fits: the MLPs in pieces (one more MLP forward per layer in backward), and only then
  // segments of layers (two more forwards of every layer; plan_once takes them where no other plan fits).
  const int64_t had = model.mlp_chunk(), piece = options.mlp_chunk_when_needed;
  const bool pieces = had == 0 && piece > 0 && options.seq_len >= 2 * piece;
  std::string no_fit;
  MemoryPlan plan = plan_once(model, options, no_fit, /*segments=*/!pieces);
  if (!no_fit.empty() && pieces) {
    std::string chunked_no_fit;
    model.set_mlp_chunk(piece);
    try {
      MemoryPlan chunked = plan_once(model, options, chunked_no_fit, /*segments=*/true);
      if (chunked_no_fit.empty()) {
        plan = chunked;
        no_fit.clear();
      } else {
        no_fit = chunked_no_fit + fmt::format(" (also tried: the MLPs in pieces of {} tokens{})", piece,
                                              options.segments_when_needed ? ", the layers in segments" : "");
      }
    } catch (...) {
      model.set_mlp_chunk(had);
      throw;
    }
    model.set_mlp_chunk(had);
  }
  if (!no_fit.empty()) throw Error(fmt::format("[{}] {}", kOp, no_fit));
  return plan;
}

int64_t MemoryPlan::num_checkpointed() const {
  return static_cast<int64_t>(layer_activations.size()) -
         std::count(layer_activations.begin(), layer_activations.end(), LayerActivations::keep);
}

std::string MemoryPlan::describe() const {
  auto f = [](size_t v) { return format_bytes(static_cast<double>(v)); };
  const int64_t n = static_cast<int64_t>(layer_activations.size()), ck = num_checkpointed();
  const auto offloaded = std::count_if(layer_activations.begin(), layer_activations.end(), is_offloaded);
  const auto with_qkv = std::count(layer_activations.begin(), layer_activations.end(), LayerActivations::offload_qkv);
  std::string s = fmt::format("memory plan for batches of {} x {} tokens on {}, budget {}:\n", batch_size, seq_len,
                              device.str(), f(budget_bytes));
  if (segment_layers > 0) {
    const int64_t segments = (n + segment_layers - 1) / segment_layers;
    s += fmt::format("  decoder layers: all {} in {} segment{} of {} (each runs forward again in backward, its layers "
                     "checkpointed)", n, segments, segments == 1 ? "" : "s", segment_layers);
    if (offloaded > 0)
      s += fmt::format(", the inputs of {} segments in pinned host memory ({})", offloaded, f(host_bytes));
  } else {
    s += fmt::format("  decoder layers: {} of {} kept whole ({}), {} checkpointed ({})", n - ck, n,
                     layer_ranges(layer_activations, LayerActivations::keep), ck - offloaded,
                     layer_ranges(layer_activations, LayerActivations::checkpoint));
  }
  if (offloaded > 0 && segment_layers == 0)
    s += fmt::format(", {} checkpointed with their inputs and attention outputs in pinned host memory ({}; {})", offloaded,
                     layer_ranges(layer_activations, is_offloaded), f(host_bytes));
  if (with_qkv > 0)
    s += fmt::format(", of those {} with q, k, v and the residual stream there too ({})", with_qkv,
                     layer_ranges(layer_activations, LayerActivations::offload_qkv));
  if (mlp_chunk > 0) s += fmt::format("\n  MLPs in pieces of {} tokens", mlp_chunk);
  if (dequantized_layers > 0)
    s += fmt::format("\n  NF4 weights kept dequantised in {} of {} decoder layers ({}): no dequantisation there", dequantized_layers,
                     n, f(dequantized_bytes));
  s += fmt::format("\n  loss head: chunks of {} tokens\n", loss_chunk);
  s += fmt::format("  predicted peak {} at {}: model and other tensors {}{} + gradients {} + optimizer state {} + batch {} "
                   "+ activations {} + {} at the peak\n",
                   f(predicted_peak_bytes), peak_at, f(static_bytes),
                   dequantized_bytes > 0 ? " + dequantised weights " + f(dequantized_bytes) : std::string(),
                   f(gradient_bytes), f(optimizer_bytes), f(batch_bytes), f(activation_bytes), f(peak_extra_bytes));
  const int64_t tokens = batch_size * seq_len;
  s += fmt::format("  one decoder layer keeps {} for backward (checkpointed: {}); the smallest budget that fits: {}",
                   f(layer.kept.saved.at(tokens)), f(layer.checkpointed.saved.at(tokens)), f(minimum_budget_bytes));
  return s;
}

void MemoryPlan::apply(Llama& model) const {
  model.set_layer_activations(layer_activations);
  model.set_loss_memory_budget(loss_memory_budget);
  model.set_mlp_chunk(mlp_chunk);
  model.set_dequantized_layers(dequantized_layers);
}

}  // namespace kiln::nn

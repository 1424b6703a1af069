// The Trainer's loop (see trainer.h): micro-batches fetched first so the step's loss is a mean over
// all their loss tokens, the collectives of the data-parallel seam, eval, checkpoints and callbacks.
#include "train/trainer.h"

#include <cmath>
#include <limits>

#include "autograd/grad_mode.h"
#include "nn/llama.h"
#include "train/progress.h"

namespace kiln::train {

namespace {

// Skipping (skip_nonfinite_steps) gives up after this many non-finite steps in a row: the run is not
// recovering, and with unbounded epochs it would skip forever.
constexpr int64_t kMaxConsecutiveSkips = 16;

data::Batch on_device(const data::Batch& b, Device device) {
  return {to_device(b.input_ids, device), to_device(b.labels, device), b.n_loss_tokens};
}

// What a rank short of a batch runs in lockstep: `like`'s inputs with every label ignored, or one token.
data::Batch padding_batch(const data::Batch* like) {
  if (like) return {like->input_ids, full_like(like->labels, static_cast<double>(data::kIgnoreIndex)), 0};
  return {zeros({1, 1}, DType::i64), full({1, 1}, static_cast<double>(data::kIgnoreIndex), DType::i64), 0};
}

}  // namespace

BatchLossFn llama_loss(bool chunked) {
  return [chunked](nn::Module& model, const data::Batch& batch) {
    auto* llama = dynamic_cast<nn::Llama*>(&model);
    KILN_CHECK(llama != nullptr, "trainer", "the default loss expected an nn::Llama, found {} (set TrainerOptions::loss)",
               model.type_name());
    Tensor hidden = (*llama)(batch.input_ids);  // (B, T, hidden), through the model's hooks (fully_shard's)
    // read by the head alone: its gradient takes its memory
    return chunked ? llama->chunked_loss(hidden, batch.labels, Reduction::sum, /*overwrite_hidden=*/true)
                   : llama->loss(hidden, batch.labels, Reduction::sum);
  };
}

Trainer::Trainer(nn::Module& model, nn::Optimizer& optimizer, data::PackedDataset& train_data, TrainerOptions options)
    : model_(model), optimizer_(optimizer), train_data_(train_data), options_(std::move(options)) {
  const TrainerOptions& o = options_;
  KILN_CHECK(o.max_steps >= 0 && o.grad_accum >= 1 && o.log_every >= 1, "trainer",
             "expected max_steps >= 0, grad_accum >= 1 and log_every >= 1, found {}, {} and {}", o.max_steps,
             o.grad_accum, o.log_every);
  KILN_CHECK(o.clip >= 0 && o.eval_every >= 0 && o.eval_batches >= 1 && o.save_every >= 0, "trainer",
             "expected clip >= 0, eval_every >= 0, eval_batches >= 1 and save_every >= 0, found {}, {}, {} and {}", o.clip,
             o.eval_every, o.eval_batches, o.save_every);
  parallel_ = o.parallel ? o.parallel : std::make_shared<SingleProcess>();
  KILN_CHECK(parallel_->world_size() >= 1 && parallel_->rank() >= 0 && parallel_->rank() < parallel_->world_size(),
             "trainer", "expected 0 <= rank < world size, found rank {} of {}", parallel_->rank(), parallel_->world_size());
  if (o.memory_budget) plan_memory();
  loss_ = o.loss ? o.loss : llama_loss(true);
  if (o.compile) {
    loss_ = o.compile(model_, loss_);
    KILN_CHECK(static_cast<bool>(loss_), "trainer", "expected the compile hook to return a loss function, found an empty one");
  }
  params_ = optimizer_.parameters();
  if (o.eval_data) eval_start_ = o.eval_data->position();
  state_.fingerprint = o.fingerprint;
  state_.data = train_data_.position();
  manual_seed(o.seed);
  state_.rng = default_generator().state();
  window_start_ = std::chrono::steady_clock::now();
}

void Trainer::plan_memory() {
  auto* llama = dynamic_cast<nn::Llama*>(&model_);
  KILN_CHECK(llama != nullptr, "trainer", "memory_budget plans an nn::Llama's memory, found {}", model_.type_name());
  KILN_CHECK(!options_.loss, "trainer",
             "memory_budget plans for the default loss (the chunked head); unset TrainerOptions::loss or memory_budget");
  KILN_CHECK(parallel_->world_size() == 1, "trainer", "memory_budget plans for one process, found a world of {}",
             parallel_->world_size());
  nn::MemoryPlanOptions mo = options_.memory_plan_options;
  mo.batch_size = train_data_.options().batch_size;
  mo.seq_len = train_data_.options().seq_len;
  mo.budget_bytes = *options_.memory_budget;
  mo.optimizer_state_bytes = optimizer_.pending_state_bytes();
  memory_plan_ = nn::plan_memory(*llama, mo);
  memory_plan_->apply(*llama);
}

void Trainer::add_callback(std::shared_ptr<Callback> callback) {
  KILN_CHECK(callback != nullptr, "trainer", "add_callback expected a callback, found null");
  callbacks_.push_back(std::move(callback));
}

template <class F> void Trainer::each_callback(F&& f) {
  for (const auto& c : callbacks_) f(*c);
}

void Trainer::resume(const std::string& dir) {
  TrainerState s = parallel_->load_checkpoint(dir, model_, optimizer_, options_.fingerprint);
  train_data_.restore(s.data);
  default_generator().set_state(s.rng);
  state_ = std::move(s);
}

std::optional<std::string> Trainer::resume_latest() {
  KILN_CHECK(!options_.output.empty(), "trainer", "resume expected TrainerOptions::output to name a folder, found \"\"");
  const auto dir = latest_checkpoint(options_.output);
  if (dir) resume(*dir);
  return dir;
}

std::vector<data::Batch> Trainer::next_micro_batches(int64_t& slots) {
  std::vector<data::Batch> micro;
  const int64_t world = parallel_->world_size(), rank = parallel_->rank();
  int64_t read = 0;
  for (int64_t m = 0; m < options_.grad_accum; ++m) {
    for (int64_t r = 0; r < world; ++r) {  // every rank reads the same stream and keeps its share
      auto b = train_data_.next();
      if (!b) {  // the epochs are done
        slots = (read + world - 1) / world;
        return micro;
      }
      ++read;
      if (r == rank) micro.push_back(std::move(*b));
    }
  }
  slots = options_.grad_accum;
  return micro;
}

bool Trainer::stop_agreed() {
  std::vector<double> v{stop_requested() ? 1.0 : 0.0};
  parallel_->all_reduce_sum(v);
  return v[0] > 0;
}

std::optional<StepInfo> Trainer::train_step() {
  int64_t slots = 0;  // the most micro-batches any rank got (the same on every rank: they read one stream)
  const std::vector<data::Batch> micro = next_micro_batches(slots);
  std::vector<double> counts{0, static_cast<double>(micro.size()), 0};  // loss tokens, micro-batches, input tokens
  for (const data::Batch& b : micro) {
    counts[0] += static_cast<double>(b.n_loss_tokens);
    counts[2] += static_cast<double>(b.input_ids.numel());
  }
  parallel_->all_reduce_sum(counts);
  if (counts[1] == 0) return std::nullopt;
  const double step_tokens = counts[0];

  if (options_.schedule) optimizer_.set_lr(options_.schedule->lr_at(state_.step));
  double step_loss = 0;
  const bool lockstep = parallel_->lockstep();
  const int64_t passes = lockstep ? (step_tokens > 0 ? slots : 0) : static_cast<int64_t>(micro.size());
  for (int64_t i = 0; i < passes; ++i) {
    const size_t k = static_cast<size_t>(i);
    const data::Batch b = k < micro.size() ? micro[k] : padding_batch(micro.empty() ? nullptr : &micro[0]);
    if (b.n_loss_tokens == 0 && !lockstep) continue;
    Tensor loss = div(loss_(model_, on_device(b, options_.device)), step_tokens);  // this batch's share of the mean
    loss.backward();
    step_loss += loss.item<double>();
  }
  parallel_->all_reduce_gradients(params_);
  std::vector<double> losses{step_loss};
  parallel_->all_reduce_sum(losses);
  // The global gradient norm (one fused multi-tensor launch and one host read), clipped to `clip` or, with
  // clip off, only measured (no norm reaches the largest double). It is the non-finite check: an inf or NaN
  // in any gradient makes it non-finite, and clip_grad_norm leaves such gradients as they are.
  const double grad_norm =
      parallel_->clip_grad_norm(params_, options_.clip > 0 ? options_.clip : std::numeric_limits<double>::max());
  StepInfo s;
  s.lr = optimizer_.lr();
  if (!std::isfinite(losses[0]) || !std::isfinite(grad_norm)) {  // the same verdict on every rank
    const std::string report = nonfinite_report(losses[0], grad_norm);
    optimizer_.zero_grad();
    KILN_CHECK(options_.skip_nonfinite_steps, "trainer",
               "{}; stopped before the optimizer update (the weights are those after step {}). Lower the learning rate "
               "or check the data, or skip such steps (TrainerOptions::skip_nonfinite_steps)",
               report, state_.step);
    KILN_CHECK(++consecutive_skips_ <= kMaxConsecutiveSkips, "trainer",
               "{}; the {} steps before it were skipped for the same reason: stopping (the run is not recovering)", report,
               kMaxConsecutiveSkips);
    ++state_.skipped_steps;
    window_tokens_ += static_cast<int64_t>(counts[2]);
    s.step = state_.step + 1;
    s.total_steps = options_.max_steps;
    s.loss = losses[0];
    s.grad_norm = grad_norm;
    s.loss_tokens = static_cast<int64_t>(step_tokens);
    s.tokens = state_.tokens;
    s.skipped = true;
    s.skip_reason = report;
    return s;
  }
  consecutive_skips_ = 0;
  optimizer_.step();
  optimizer_.zero_grad();

  ++state_.step;
  state_.tokens += static_cast<int64_t>(step_tokens);
  state_.train_losses.push_back({state_.step, losses[0]});
  window_tokens_ += static_cast<int64_t>(counts[2]);
  s.step = state_.step;
  s.total_steps = options_.max_steps;
  s.loss = losses[0];
  s.grad_norm = grad_norm;
  s.loss_tokens = static_cast<int64_t>(step_tokens);
  s.tokens = state_.tokens;
  s.log = state_.step % options_.log_every == 0 || state_.step == options_.max_steps;
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - window_start_).count();
  s.tokens_per_s = secs > 0 ? static_cast<double>(window_tokens_) / secs : 0.0;
  s.memory_gib = memory_gib(options_.device);
  if (s.log) {
    window_start_ = now;
    window_tokens_ = 0;
  }
  return s;
}

std::string Trainer::nonfinite_report(double loss, double grad_norm) const {
  autograd::NoGradGuard no_grad;
  std::string first;
  int64_t bad = 0;
  for (const auto& [name, p] : params_) {  // this rank's gradients (a sharded run: its shards)
    const Tensor g = p.grad();
    if (!g.defined()) continue;
    const Tensor f = cast(g, DType::f32);
    if (std::isfinite(sum(mul(f, 0.0)).item<double>())) continue;  // 0 * x is NaN exactly where x is inf or NaN
    if (bad++ == 0)
      first = fmt::format("the gradient of '{}' holds {}", name, std::isnan(sum(abs(f)).item<double>()) ? "nan" : "inf");
  }
  if (bad > 1) first += fmt::format(" ({} parameters' gradients are non-finite)", bad);
  const int64_t step = state_.step + 1;
  if (!std::isfinite(loss)) return fmt::format("step {}: the loss is {}{}", step, loss, first.empty() ? "" : "; " + first);
  if (bad > 0) return fmt::format("step {}: {} (the loss is {:.6g})", step, first, loss);
  return fmt::format("step {}: the gradient norm is {} although every gradient held by this rank is finite (the norm "
                     "overflowed, or another rank's gradient holds the inf/NaN)",
                     step, grad_norm);
}

EvalInfo Trainer::evaluate() {
  KILN_CHECK(options_.eval_data != nullptr, "trainer", "evaluate() expected TrainerOptions::eval_data, found none");
  data::PackedDataset& ds = *options_.eval_data;
  ds.restore(*eval_start_);
  const int64_t world = parallel_->world_size(), rank = parallel_->rank();
  const bool was_training = model_.is_training();
  std::vector<double> sums{0, 0};  // summed loss, loss tokens
  {
    autograd::NoGradGuard no_grad;
    model_.eval();
    try {
      std::vector<data::Batch> mine;  // this rank's share of the eval batches
      int64_t read = 0;
      for (int64_t i = 0; i < options_.eval_batches; ++i) {
        auto batch = ds.next();
        if (!batch) break;
        ++read;
        if (i % world == rank) mine.push_back(std::move(*batch));
      }
      const bool lockstep = parallel_->lockstep();
      const int64_t passes = lockstep ? (read + world - 1) / world : static_cast<int64_t>(mine.size());
      for (int64_t i = 0; i < passes; ++i) {
        const size_t k = static_cast<size_t>(i);
        const data::Batch b = k < mine.size() ? mine[k] : padding_batch(mine.empty() ? nullptr : &mine[0]);
        if (b.n_loss_tokens == 0 && !lockstep) continue;
        const double loss = loss_(model_, on_device(b, options_.device)).item<double>();
        if (b.n_loss_tokens == 0) continue;
        sums[0] += loss;
        sums[1] += static_cast<double>(b.n_loss_tokens);
      }
    } catch (...) {
      model_.train(was_training);
      throw;
    }
    model_.train(was_training);
  }
  parallel_->all_reduce_sum(sums);
  return {state_.step, sums[1] > 0 ? sums[0] / sums[1] : NAN, static_cast<int64_t>(sums[1])};
}

std::string Trainer::save_checkpoint() {
  KILN_CHECK(!options_.output.empty(), "trainer", "save_checkpoint expected TrainerOptions::output to name a folder, found \"\"");
  state_.data = train_data_.position();
  state_.rng = default_generator().state();
  const nn::LoraConfig* lora = options_.lora ? &*options_.lora : nullptr;
  const std::string path = parallel_->save_checkpoint(options_.output, model_, lora, optimizer_, state_);
  const SaveInfo info{state_.step, path};
  each_callback([&](Callback& c) { c.on_save(*this, info); });
  return path;
}

FitResult Trainer::fit() {
  FitResult r;
  r.first_step = state_.step;
  window_start_ = std::chrono::steady_clock::now();
  window_tokens_ = 0;
  each_callback([&](Callback& c) { c.on_train_begin(*this); });
  const bool saving = !options_.output.empty();
  int64_t saved_step = -1;
  auto save = [&] {
    r.checkpoint = save_checkpoint();
    saved_step = state_.step;
  };
  for (;;) {
    if (stop_agreed()) {
      r.stopped = true;
      break;
    }
    if (options_.max_steps > 0 && state_.step >= options_.max_steps) break;
    const std::optional<StepInfo> s = train_step();
    if (!s) break;  // the training data is done
    if (s->skipped) {
      ++r.skipped_steps;
      each_callback([&](Callback& c) { c.on_step_skipped(*this, *s); });
      continue;
    }
    r.losses.push_back(s->loss);
    each_callback([&](Callback& c) { c.on_step_end(*this, *s); });
    const bool eval_due = options_.eval_every > 0 && (s->step % options_.eval_every == 0 || s->step == options_.max_steps);
    if (eval_due && options_.eval_data) {
      const EvalInfo e = evaluate();
      r.eval_losses.push_back(e.loss);
      state_.eval_losses.push_back({e.step, e.loss});
      each_callback([&](Callback& c) { c.on_eval(*this, e); });
    }
    if (saving && options_.save_every > 0 && s->step % options_.save_every == 0) save();
  }
  if (saving && saved_step != state_.step) save();
  if (r.stopped) stop_.store(false, std::memory_order_relaxed);
  r.last_step = state_.step;
  const EndInfo end{state_.step, r.stopped, r.checkpoint};
  each_callback([&](Callback& c) { c.on_train_end(*this, end); });
  return r;
}

}  // namespace kiln::train

// train::Trainer on the tiny Llama and random documents, without any command-line code: exact resume
// (3 + 3 steps == 6 with LoRA dropout), token-weighted accumulation == one big batch, stop on request
// (from a signal handler), eval loss, callback order, bad checkpoints, and the data-parallel and compile seams.
#include <catch2/catch_get_random_seed.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <unistd.h>

#include "io/safetensors.h"
#include "nn/llama.h"
#include "tests/helpers.h"
#include "train/trainer.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

uint64_t test_seed(uint64_t k) { return data::mix_seed(Catch::getSeed(), k); }

struct RigSpec {
  uint64_t seed = 0;
  bool lora = true;
  double dropout = 0.1;
  int64_t batch_size = 2;
  int64_t seq_len = 16;
  bool shuffle = true;
  bool sgd = false;  // SGD without momentum (an update reveals the gradient); else AdamW
  double lr = 1e-2;
};

// A tiny Llama (random init, LoRA unless told), its optimizer, its training stream and the Trainer.
struct Rig {
  std::shared_ptr<nn::Llama> model;
  std::unique_ptr<nn::Optimizer> optimizer;
  std::unique_ptr<data::PackedDataset> data;
  std::unique_ptr<train::Trainer> trainer;
};

Rig make_rig(const std::vector<data::Document>& docs, const RigSpec& s, train::TrainerOptions o) {
  Rig r;
  nn::LlamaOptions lo;
  lo.seed = s.seed;
  r.model = std::make_shared<nn::Llama>(nn::LlamaConfig::named("tiny"), lo);
  if (s.lora) {
    nn::LoraConfig lc;
    lc.r = 4;
    lc.alpha = 8;
    lc.dropout = s.dropout;
    nn::apply_lora(*r.model, lc, s.seed + 1);
    o.lora = lc;
  }
  r.model->train();
  if (s.sgd) {
    nn::SGDOptions so;
    so.lr = s.lr;
    r.optimizer = std::make_unique<nn::SGD>(r.model->named_trainable_parameters(), so);
  } else {
    nn::AdamWOptions ao;
    ao.lr = s.lr;
    ao.weight_decay = 0.0;
    r.optimizer = std::make_unique<nn::AdamW>(r.model->named_trainable_parameters(), ao);
  }
  data::PackOptions po;
  po.seq_len = s.seq_len;
  po.batch_size = s.batch_size;
  po.seed = s.seed;
  po.shuffle = s.shuffle;
  r.data = std::make_unique<data::PackedDataset>(docs, po);
  r.trainer = std::make_unique<train::Trainer>(*r.model, *r.optimizer, *r.data, std::move(o));
  return r;
}

std::shared_ptr<data::PackedDataset> eval_stream(const std::vector<data::Document>& docs) {
  data::PackOptions eo;
  eo.seq_len = 16;
  eo.batch_size = 2;
  eo.shuffle = false;
  eo.epochs = 1;
  return std::make_shared<data::PackedDataset>(docs, eo);
}

// Calls request_stop() after step `at` (counted from the run's start).
struct StopAt : train::Callback {
  explicit StopAt(int64_t at) : at_(at) {}
  void on_step_end(train::Trainer& t, const train::StepInfo& s) override {
    if (s.step == at_) t.request_stop();
  }
  int64_t at_;
};

// A world of one rank that keeps a copy of the gradients it is asked to all-reduce (after backward,
// before clipping): the step's gradient as the trainer computed it.
struct GradCapture : train::DataParallel {
  int64_t rank() const override { return 0; }
  int64_t world_size() const override { return 1; }
  void all_reduce_sum(std::vector<double>&) override {}
  void all_reduce_gradients(const nn::NamedTensors& params) override {
    grads.clear();
    for (const auto& [name, p] : params) grads[name] = p.grad().clone();
  }
  std::map<std::string, Tensor> grads;
};

}  // namespace

TEST_CASE("trainer: 3 steps, stop, resume, 3 steps equal 6 steps bit for bit (LoRA dropout on)", "[trainer]") {
  const fs::path root = test::scratch_dir("trainer", "resume");
  const auto docs = test::random_documents(24, test_seed(1), 4096);
  const auto eval_docs = test::random_documents(6, test_seed(2), 4096);
  auto options = [&](const std::string& out) {
    train::TrainerOptions o;
    o.max_steps = 6;
    o.grad_accum = 2;
    o.clip = 0.5;
    o.schedule.emplace("cosine", 1e-2, 2, 6);
    o.seed = test_seed(3);
    o.eval_data = eval_stream(eval_docs);
    o.eval_every = 3;
    o.output = (root / out).string();
    o.fingerprint = "lora_r=4;lr=0.01;";
    return o;
  };
  const RigSpec spec{.seed = test_seed(4), .dropout = 0.2};

  Rig full = make_rig(docs, spec, options("full"));
  const uint64_t offset0 = default_generator().state().offset;
  const train::FitResult all = full.trainer->fit();
  REQUIRE(all.losses.size() == 6);
  REQUIRE(all.eval_losses.size() == 2);
  REQUIRE_FALSE(all.stopped);
  REQUIRE(default_generator().state().offset > offset0);  // dropout drew numbers: the RNG state matters

  Rig first = make_rig(docs, spec, options("parts"));
  first.trainer->add_callback(std::make_shared<StopAt>(3));
  const train::FitResult a = first.trainer->fit();
  REQUIRE(a.stopped);
  REQUIRE(a.last_step == 3);
  REQUIRE(fs::path(a.checkpoint).filename() == "checkpoint-3");

  Rig second = make_rig(docs, spec, options("parts"));  // a fresh process: new model, optimizer and data
  REQUIRE(second.trainer->resume_latest() == a.checkpoint);
  REQUIRE(second.trainer->state().step == 3);
  const train::FitResult b = second.trainer->fit();
  REQUIRE(b.first_step == 3);
  REQUIRE(b.last_step == 6);
  std::vector<double> joined = a.losses;
  joined.insert(joined.end(), b.losses.begin(), b.losses.end());
  REQUIRE(joined == all.losses);  // bit for bit
  std::vector<double> evals = a.eval_losses;
  evals.insert(evals.end(), b.eval_losses.begin(), b.eval_losses.end());
  REQUIRE(evals == all.eval_losses);
  REQUIRE(second.trainer->state().train_losses.size() == 6);  // the history spans the resume
  for (const char* file : {"adapter/adapter_model.safetensors", "optimizer.safetensors"}) {
    const std::string x = test::read_file(root / "full" / "checkpoint-6" / file), y = test::read_file(root / "parts" / "checkpoint-6" / file);
    REQUIRE(x.size() > 100);
    REQUIRE(x == y);
  }
  fs::remove_all(root);
}

TEST_CASE("trainer: token-weighted accumulation equals one batch holding the same tokens", "[trainer]") {
  const int64_t vocab = nn::LlamaConfig::named("tiny").vocab_size;
  // Two documents in stream order (no shuffle): doc 0 fully in the loss, doc 1 only from token 30. The
  // first micro-batch (rows 0-1) then holds 32 loss tokens and the second (rows 2-3) 7, so a mean of
  // the micro-batch means would weigh them wrongly.
  std::mt19937_64 rng(test_seed(5));
  std::vector<data::Document> docs(2);
  for (size_t d = 0; d < 2; ++d)
    for (int i = 0; i < 40; ++i) {
      docs[d].ids.push_back(static_cast<int32_t>(1 + data::bounded_draw(rng, static_cast<uint64_t>(vocab - 1))));
      docs[d].loss.push_back(d == 0 || i >= 30 ? 1 : 0);
    }
  const RigSpec spec{.seed = test_seed(6), .lora = false, .batch_size = 2, .shuffle = false, .sgd = true, .lr = 1.0};

  // The reference: one (4, 16) batch of the same rows, mean cross-entropy over its loss tokens.
  data::PackOptions po;
  po.seq_len = 16;
  po.batch_size = 4;
  po.shuffle = false;
  const data::Batch big = *data::PackedDataset(docs, po).next();
  data::PackOptions half = po;
  half.batch_size = 2;
  data::PackedDataset halves(docs, half);
  const int64_t n0 = halves.next()->n_loss_tokens, n1 = halves.next()->n_loss_tokens;
  REQUIRE(n0 != n1);
  REQUIRE(n0 + n1 == big.n_loss_tokens);
  Rig ref = make_rig(docs, spec, {});
  Tensor ref_loss = ref.model->loss(ref.model->forward(big.input_ids), big.labels, Reduction::mean);
  ref_loss.backward();

  for (const int64_t accum : {2, 1}) {
    auto capture = std::make_shared<GradCapture>();
    train::TrainerOptions o;
    o.grad_accum = accum;
    o.clip = 0;
    o.parallel = capture;
    RigSpec s = spec;
    s.batch_size = 4 / accum;
    Rig rig = make_rig(docs, s, o);
    const std::optional<train::StepInfo> step = rig.trainer->train_step();
    REQUIRE(step.has_value());
    REQUIRE(step->loss_tokens == big.n_loss_tokens);
    CHECK(std::abs(step->loss - ref_loss.item<double>()) < 1e-5 * std::abs(ref_loss.item<double>()));
    REQUIRE(capture->grads.size() == ref.model->named_trainable_parameters().size());
    for (const auto& [name, p] : ref.model->named_trainable_parameters()) {
      INFO(name << " with grad_accum " << accum);
      test::require_close(capture->grads.at(name), p.grad(), 1e-3, 1e-6);
    }
  }
}

namespace {
std::atomic<train::Trainer*> g_signal_trainer{nullptr};
extern "C" void stop_on_signal(int) {
  if (train::Trainer* t = g_signal_trainer.load()) t->request_stop();
}
}  // namespace

TEST_CASE("trainer: a stop request (from a signal handler) writes a checkpoint; resume continues", "[trainer]") {
  const fs::path root = test::scratch_dir("trainer", "stop");
  const auto docs = test::random_documents(16, test_seed(7), 4096);
  train::TrainerOptions o;
  o.max_steps = 4;
  o.output = (root / "run").string();
  o.seed = test_seed(8);
  const RigSpec spec{.seed = test_seed(9)};
  Rig rig = make_rig(docs, spec, o);

  // Asked before fit(): no step, a checkpoint of the current state.
  rig.trainer->request_stop();
  const train::FitResult none = rig.trainer->fit();
  REQUIRE(none.stopped);
  REQUIRE(none.losses.empty());
  REQUIRE(fs::path(none.checkpoint).filename() == "checkpoint-0");
  REQUIRE_FALSE(rig.trainer->stop_requested());  // consumed by the fit() it ended

  struct RaiseAt2 : train::Callback {
    void on_step_end(train::Trainer&, const train::StepInfo& s) override {
      if (s.step == 2) std::raise(SIGINT);
    }
  };
  g_signal_trainer = rig.trainer.get();
  auto previous = std::signal(SIGINT, stop_on_signal);
  rig.trainer->add_callback(std::make_shared<RaiseAt2>());
  const train::FitResult a = rig.trainer->fit();
  std::signal(SIGINT, previous);
  g_signal_trainer = nullptr;
  REQUIRE(a.stopped);
  REQUIRE(a.last_step == 2);
  REQUIRE(a.checkpoint == (root / "run" / "checkpoint-2").string());
  REQUIRE(train::latest_checkpoint(o.output) == a.checkpoint);

  // The same trainer goes on in memory; a new one resumes from the checkpoint: the same steps.
  const train::FitResult on = rig.trainer->fit();
  REQUIRE_FALSE(on.stopped);
  REQUIRE(on.losses.size() == 2);
  Rig resumed = make_rig(docs, spec, o);
  resumed.trainer->resume(a.checkpoint);
  const train::FitResult b = resumed.trainer->fit();
  REQUIRE(b.first_step == 2);
  REQUIRE(b.losses == on.losses);
  fs::remove_all(root);
}

TEST_CASE("trainer: eval loss is the token-weighted mean over the held-out batches, in eval mode", "[trainer]") {
  const auto docs = test::random_documents(8, test_seed(10), 4096);
  const auto eval_docs = test::random_documents(9, test_seed(11), 4096);
  train::TrainerOptions o;
  o.eval_data = eval_stream(eval_docs);
  o.eval_batches = 3;
  o.loss = train::llama_loss(/*chunked=*/false);
  Rig rig = make_rig(docs, {.seed = test_seed(12), .dropout = 0.5}, o);
  rig.trainer->train_step();  // LoRA B is no longer zero: dropout would change the loss

  double total = 0;
  int64_t tokens = 0;
  {
    auto ref = eval_stream(eval_docs);
    autograd::NoGradGuard no_grad;
    rig.model->eval();
    for (int i = 0; i < 3; ++i) {
      const data::Batch b = *ref->next();
      total += rig.model->loss(rig.model->forward(b.input_ids), b.labels, Reduction::sum).item<double>();
      tokens += b.n_loss_tokens;
    }
    rig.model->train();
  }
  const train::EvalInfo e = rig.trainer->evaluate();
  REQUIRE(e.step == 1);
  REQUIRE(e.tokens == tokens);
  CHECK(std::abs(e.loss - total / static_cast<double>(tokens)) < 1e-6 * e.loss);
  REQUIRE(rig.model->is_training());
  REQUIRE(rig.trainer->evaluate().loss == e.loss);  // the eval stream restarts each time

  train::TrainerOptions none;
  Rig bare = make_rig(docs, {.seed = test_seed(12)}, none);
  REQUIRE_THROWS_WITH(bare.trainer->evaluate(), ContainsSubstring("[trainer] evaluate() expected TrainerOptions::eval_data"));
}

TEST_CASE("trainer: callbacks fire in order with the right step numbers", "[trainer]") {
  const fs::path root = test::scratch_dir("trainer", "callbacks");
  struct Recorder : train::Callback {
    explicit Recorder(std::vector<std::string>& log, std::string tag) : log_(log), tag_(std::move(tag)) {}
    void on_train_begin(train::Trainer& t) override { log_.push_back(tag_ + fmt::format("begin {}", t.state().step)); }
    void on_step_end(train::Trainer& t, const train::StepInfo& s) override {
      log_.push_back(tag_ + fmt::format("step {} log {}", s.step, s.log));
      CHECK(s.lr == t.options().schedule->lr_at(s.step - 1));
      CHECK(s.tokens == t.state().tokens);
      CHECK(s.loss_tokens > 0);
      CHECK(std::isfinite(s.loss));
    }
    void on_eval(train::Trainer&, const train::EvalInfo& e) override { log_.push_back(tag_ + fmt::format("eval {}", e.step)); }
    void on_save(train::Trainer&, const train::SaveInfo& s) override {
      CHECK(fs::exists(fs::path(s.path) / "trainer_state.json"));
      log_.push_back(tag_ + fmt::format("save {} {}", s.step, fs::path(s.path).filename().string()));
    }
    void on_train_end(train::Trainer&, const train::EndInfo& e) override {
      log_.push_back(tag_ + fmt::format("end {} stopped {}", e.step, e.stopped));
    }
    std::vector<std::string>& log_;
    std::string tag_;
  };
  train::TrainerOptions o;
  o.max_steps = 5;
  o.schedule.emplace("linear", 1e-2, 1, 5);
  o.eval_data = eval_stream(test::random_documents(4, test_seed(13), 4096));
  o.eval_every = 2;
  o.save_every = 4;
  o.log_every = 2;
  o.output = (root / "run").string();
  Rig rig = make_rig(test::random_documents(16, test_seed(14), 4096), {.seed = test_seed(15)}, o);
  std::vector<std::string> log;
  rig.trainer->add_callback(std::make_shared<Recorder>(log, ""));
  rig.trainer->add_callback(std::make_shared<Recorder>(log, "2:"));
  rig.trainer->fit();
  const std::vector<std::string> want = {
      "begin 0", "2:begin 0",
      "step 1 log false", "2:step 1 log false",
      "step 2 log true", "2:step 2 log true", "eval 2", "2:eval 2",
      "step 3 log false", "2:step 3 log false",
      "step 4 log true", "2:step 4 log true", "eval 4", "2:eval 4", "save 4 checkpoint-4", "2:save 4 checkpoint-4",
      "step 5 log true", "2:step 5 log true", "eval 5", "2:eval 5", "save 5 checkpoint-5", "2:save 5 checkpoint-5",
      "end 5 stopped false", "2:end 5 stopped false"};
  REQUIRE(log == want);
  fs::remove_all(root);
}

TEST_CASE("trainer: corrupt, missing or mismatched checkpoints are clear errors", "[trainer]") {
  const fs::path root = test::scratch_dir("trainer", "bad");
  const auto docs = test::random_documents(12, test_seed(16), 4096);
  train::TrainerOptions o;
  o.max_steps = 2;
  o.output = (root / "run").string();
  o.fingerprint = "lora_r=4;lr=0.01;";
  const RigSpec spec{.seed = test_seed(17)};
  make_rig(docs, spec, o).trainer->fit();
  const fs::path ckpt = root / "run" / "checkpoint-2";
  auto resume = [&](train::TrainerOptions opts) { make_rig(docs, spec, std::move(opts)).trainer->resume_latest(); };

  train::TrainerOptions other = o;
  other.fingerprint = "lora_r=4;lr=0.02;";
  REQUIRE_THROWS_WITH(resume(other), ContainsSubstring("other settings: lr: checkpoint '0.01', now '0.02'"));

  const std::string good = test::read_file(ckpt / "trainer_state.json");
  std::ofstream(ckpt / "trainer_state.json") << good.substr(0, good.size() / 2);
  REQUIRE_THROWS_WITH(resume(o), ContainsSubstring("[checkpoint]") && ContainsSubstring("corrupt trainer state"));
  // A float where an integer belongs is refused, not converted (found by the trainer_state fuzzer).
  std::string float_step = good;
  const size_t step_at = float_step.find("\"step\": 2,");
  REQUIRE(step_at != std::string::npos);
  float_step.replace(step_at, 10, "\"step\": -1.1e59,");
  REQUIRE_THROWS_WITH(train::TrainerState::from_json(float_step, "state.json"),
                      ContainsSubstring("state.json: step must be an integer, found -1.1e+59"));
  std::ofstream(ckpt / "trainer_state.json") << good;
  REQUIRE_NOTHROW(resume(o));

  const std::string adapter = test::read_file(ckpt / "adapter" / "adapter_model.safetensors");
  fs::resize_file(ckpt / "adapter" / "adapter_model.safetensors", 40);
  REQUIRE_THROWS_AS(resume(o), Error);
  std::ofstream(ckpt / "adapter" / "adapter_model.safetensors", std::ios::binary) << adapter;
  fs::resize_file(ckpt / "optimizer.safetensors", 100);
  REQUIRE_THROWS_AS(resume(o), Error);
  fs::remove(ckpt / "optimizer.safetensors");
  REQUIRE_THROWS_WITH(resume(o), ContainsSubstring("expected optimizer.safetensors, found none"));

  std::ofstream(root / "run" / "latest") << "checkpoint-9\n";
  REQUIRE_THROWS_WITH(resume(o), ContainsSubstring("which does not exist"));
  train::TrainerOptions empty = o;
  empty.output = (root / "nothing").string();
  REQUIRE_FALSE(make_rig(docs, spec, empty).trainer->resume_latest().has_value());
  empty.output = "";
  REQUIRE_THROWS_WITH(resume(empty), ContainsSubstring("[trainer] resume expected TrainerOptions::output"));

  // Without LoRA the checkpoint holds the trainable parameters; they must be exactly the model's.
  train::TrainerOptions full = o;
  full.output = (root / "full").string();
  RigSpec all = spec;
  all.lora = false;
  Rig trained = make_rig(docs, all, full);
  trained.trainer->fit();
  Rig back = make_rig(docs, all, full);
  REQUIRE(back.trainer->resume_latest().has_value());
  const auto restored = back.model->named_trainable_parameters();
  const auto want = trained.model->named_trainable_parameters();
  REQUIRE(restored.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) test::require_equal(restored[i].second, want[i].second);
  const fs::path trainable = root / "full" / "checkpoint-2" / "trainable.safetensors";
  io::save_safetensors(trainable.string(), {{"model.norm.weight", randn({256})}, {"stray", randn({2})}});
  REQUIRE_THROWS_WITH(make_rig(docs, all, full).trainer->resume_latest(),
                      ContainsSubstring("expected only the model's trainable parameters, found 'stray'"));
  fs::remove_all(root);
}

namespace {

// W ranks as threads of one process: all_reduce sums through a shared buffer behind a barrier.
class ThreadWorld {
 public:
  explicit ThreadWorld(int64_t size) : size_(size) {}
  int64_t size() const { return size_; }
  void all_reduce(std::vector<double>& v) {
    std::unique_lock<std::mutex> lock(mu_);
    if (arrived_ == 0) sum_.assign(v.size(), 0.0);
    for (size_t i = 0; i < v.size(); ++i) sum_[i] += v[i];
    const uint64_t generation = generation_;
    if (++arrived_ == size_) {
      result_ = sum_;
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
    v = result_;
  }

 private:
  int64_t size_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<double> sum_, result_;
};

struct ThreadRank : train::DataParallel {
  ThreadRank(ThreadWorld& world, int64_t rank) : world_(world), rank_(rank) {}
  int64_t rank() const override { return rank_; }
  int64_t world_size() const override { return world_.size(); }
  void all_reduce_sum(std::vector<double>& values) override { world_.all_reduce(values); }
  void all_reduce_gradients(const nn::NamedTensors& params) override {
    std::vector<double> flat;
    for (const auto& [name, p] : params) {
      const Tensor g = p.grad();
      if (g.defined()) {
        const std::vector<float> v = g.to_vector<float>();
        flat.insert(flat.end(), v.begin(), v.end());
      } else {
        flat.resize(flat.size() + static_cast<size_t>(p.numel()), 0.0);
      }
    }
    world_.all_reduce(flat);
    size_t at = 0;
    for (const auto& [name, p] : params) {
      const std::vector<float> v(flat.begin() + static_cast<long>(at), flat.begin() + static_cast<long>(at + static_cast<size_t>(p.numel())));
      at += static_cast<size_t>(p.numel());
      Tensor handle = p;
      handle.set_grad(from_vector<float>(v, p.shape()));
    }
  }
  ThreadWorld& world_;
  int64_t rank_;
};

}  // namespace

TEST_CASE("trainer: two data-parallel ranks train as one process with twice the accumulation", "[trainer]") {
  const fs::path root = test::scratch_dir("trainer", "dp");
  const auto docs = test::random_documents(24, test_seed(18), 4096);
  const auto eval_docs = test::random_documents(6, test_seed(19), 4096);
  const RigSpec spec{.seed = test_seed(20), .dropout = 0.0};
  auto options = [&](const std::string& out) {
    train::TrainerOptions o;
    o.max_steps = 3;
    o.eval_data = eval_stream(eval_docs);
    o.eval_every = 3;
    o.output = (root / out).string();
    return o;
  };
  train::TrainerOptions single_options = options("single");
  single_options.grad_accum = 2;
  Rig single = make_rig(docs, spec, single_options);
  const train::FitResult want = single.trainer->fit();

  ThreadWorld world(2);
  std::vector<Rig> ranks;
  for (int64_t r = 0; r < 2; ++r) {
    train::TrainerOptions o = options("dp");
    o.parallel = std::make_shared<ThreadRank>(world, r);
    ranks.push_back(make_rig(docs, spec, o));
  }
  std::vector<train::FitResult> got(2);
  std::vector<std::exception_ptr> errors(2);
  std::vector<std::thread> threads;
  for (size_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        got[r] = ranks[r].trainer->fit();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);

  for (size_t r = 0; r < 2; ++r) {
    REQUIRE(got[r].losses.size() == 3);
    for (size_t i = 0; i < 3; ++i) CHECK(std::abs(got[r].losses[i] - want.losses[i]) < 1e-6 * want.losses[i]);
    REQUIRE(got[r].eval_losses.size() == 1);
    CHECK(std::abs(got[r].eval_losses[0] - want.eval_losses[0]) < 1e-6 * want.eval_losses[0]);
    REQUIRE(ranks[r].trainer->state().tokens == single.trainer->state().tokens);
    const auto p = ranks[r].model->named_trainable_parameters(), q = single.model->named_trainable_parameters();
    for (size_t i = 0; i < p.size(); ++i) test::require_close(p[i].second, q[i].second, 1e-4, 1e-6);
  }
  // One checkpoint (rank 0's) at the data position of the single process: every rank read the whole stream.
  const std::string state = test::read_file(root / "dp" / "checkpoint-3" / "trainer_state.json");
  REQUIRE(train::TrainerState::from_json(state, "dp").data ==
          train::TrainerState::from_json(test::read_file(root / "single" / "checkpoint-3" / "trainer_state.json"), "single").data);
  fs::remove_all(root);
}

TEST_CASE("trainer: the compile hook wraps the loss once; a custom loss replaces the default", "[trainer]") {
  const auto docs = test::random_documents(12, test_seed(21), 4096);
  int compiled = 0, calls = 0;
  train::TrainerOptions o;
  o.max_steps = 2;
  o.grad_accum = 3;
  // A custom loss: the default's summed cross-entropy plus a z-loss term, written with kiln ops.
  o.loss = [](nn::Module& m, const data::Batch& b) {
    auto& llama = dynamic_cast<nn::Llama&>(m);
    Tensor hidden = llama.forward(b.input_ids);
    Tensor logits = reshape(cast(llama.logits(hidden), DType::f32), {-1, llama.config().vocab_size});  // (B*T, V)
    Tensor keep = cast(ne(reshape(b.labels, {-1}), -100.0), DType::f32);                                 // (B*T)
    Tensor z = sum(square(logsumexp(logits, {-1})) * keep);
    return cross_entropy(logits, reshape(b.labels, {-1}), -100, Reduction::sum) + z * 1e-3;
  };
  o.compile = [&](nn::Module& model, train::BatchLossFn loss) -> train::BatchLossFn {
    ++compiled;
    REQUIRE(dynamic_cast<nn::Llama*>(&model) != nullptr);
    return [&calls, loss](nn::Module& m, const data::Batch& b) {
      ++calls;
      return loss(m, b);
    };
  };
  Rig rig = make_rig(docs, {.seed = test_seed(22)}, o);
  REQUIRE(compiled == 1);
  const train::FitResult r = rig.trainer->fit();
  REQUIRE(compiled == 1);
  REQUIRE(calls == 2 * 3);  // every micro-batch went through the compiled function
  REQUIRE(r.losses.size() == 2);
  // The z-loss term is there: the step loss is above the default cross-entropy of the same model and batches.
  train::TrainerOptions default_loss;
  default_loss.grad_accum = 3;
  Rig plain = make_rig(docs, {.seed = test_seed(22)}, default_loss);
  const std::optional<train::StepInfo> first = plain.trainer->train_step();
  REQUIRE(r.losses[0] > first->loss);

  train::TrainerOptions broken;
  broken.compile = [](nn::Module&, train::BatchLossFn) { return train::BatchLossFn(); };
  REQUIRE_THROWS_WITH(make_rig(docs, {.seed = test_seed(22)}, broken), ContainsSubstring("[trainer] expected the compile hook"));
}

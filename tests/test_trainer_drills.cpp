// Failure drills of the Trainer (issue 16) on the tiny Llama: a checkpoint write that fails (an injected
// error, a real "File too large" from RLIMIT_FSIZE, a read-only folder) keeps the previous checkpoint; a
// process killed with SIGKILL mid-checkpoint resumes from the last complete one; NaN/inf losses and
// gradients stop with the step and the tensor, or are skipped and counted.
#include <catch2/catch_get_random_seed.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <poll.h>
#include <random>
#include <sstream>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nn/llama.h"
#include "tests/helpers.h"
#include "train/trainer.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

uint64_t test_seed(uint64_t k) { return data::mix_seed(Catch::getSeed(), k); }

// Every file under `dir` (relative path -> bytes).
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[fs::relative(e.path(), dir).string()] = test::read_file(e.path());
  return files;
}

// The folders of <output> whose name ends with `suffix` (".tmp", ".old").
std::vector<std::string> leftovers(const fs::path& output, const std::string& suffix) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(output)) {
    const std::string n = e.path().filename().string();
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0) out.push_back(n);
  }
  return out;
}

// A tiny Llama with LoRA (dropout on), AdamW, its training stream (endless epochs) and the Trainer.
struct Rig {
  std::shared_ptr<nn::Llama> model;
  std::unique_ptr<nn::Optimizer> optimizer;
  std::unique_ptr<data::PackedDataset> data;
  std::unique_ptr<train::Trainer> trainer;
};

Rig make_rig(const std::vector<data::Document>& docs, uint64_t seed, train::TrainerOptions o) {
  Rig r;
  nn::LlamaOptions lo;
  lo.seed = seed;
  r.model = std::make_shared<nn::Llama>(nn::LlamaConfig::named("tiny"), lo);
  nn::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.dropout = 0.1;
  nn::apply_lora(*r.model, lc, seed + 1);
  o.lora = lc;
  r.model->train();
  nn::AdamWOptions ao;
  ao.lr = 1e-2;
  ao.weight_decay = 0.0;
  r.optimizer = std::make_unique<nn::AdamW>(r.model->named_trainable_parameters(), ao);
  data::PackOptions po;
  po.seq_len = 16;
  po.batch_size = 2;
  po.seed = seed;
  r.data = std::make_unique<data::PackedDataset>(docs, po);
  r.trainer = std::make_unique<train::Trainer>(*r.model, *r.optimizer, *r.data, std::move(o));
  return r;
}

train::TrainerOptions drill_options(const fs::path& output, int64_t max_steps) {
  train::TrainerOptions o;
  o.max_steps = max_steps;
  o.save_every = 1;
  o.clip = 1.0;
  o.seed = test_seed(3);
  o.output = output.string();
  o.fingerprint = "lora_r=4;lr=0.01;";
  return o;
}

// Installs a checkpoint write hook for the scope of the drill.
struct HookGuard {
  explicit HookGuard(train::CheckpointWriteHook hook) { train::set_checkpoint_write_hook(std::move(hook)); }
  ~HookGuard() { train::set_checkpoint_write_hook({}); }
};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// Keeps a copy of every file of checkpoint-1 as on_save sees it (complete).
struct KeepFirstCheckpoint : train::Callback {
  void on_save(train::Trainer&, const train::SaveInfo& info) override {
    if (info.step == 1) files = snapshot(info.path);
  }
  std::map<std::string, std::string> files;
};

// After a failed save of checkpoint-2: checkpoint-1 is byte for byte what was written, latest names it,
// nothing partial is left, and a fresh trainer resumes from it at step 1.
void require_previous_intact(const fs::path& output, const std::vector<data::Document>& docs, uint64_t seed,
                             const std::map<std::string, std::string>& first) {
  REQUIRE(first.size() >= 4);  // adapter model + config, optimizer, trainer state
  REQUIRE(snapshot(output / "checkpoint-1") == first);
  REQUIRE(test::read_file(output / "latest") == "checkpoint-1\n");
  REQUIRE_FALSE(fs::exists(output / "checkpoint-2"));
  REQUIRE(leftovers(output, ".tmp").empty());
  Rig back = make_rig(docs, seed, drill_options(output, 3));
  REQUIRE(back.trainer->resume_latest() == (output / "checkpoint-1").string());
  REQUIRE(back.trainer->state().step == 1);
}

}  // namespace

TEST_CASE("trainer drills: a failed checkpoint write keeps the previous checkpoint and says why", "[trainer][drills]") {
  const fs::path root = test::scratch_dir("drills", "write");
  const auto docs = test::random_documents(16, test_seed(1), 4096);
  const uint64_t seed = test_seed(2);

  SECTION("an injected failure in the middle of the folder (after the adapter, at the optimizer state)") {
    const fs::path out = root / "injected";
    Rig rig = make_rig(docs, seed, drill_options(out, 3));
    auto keep = std::make_shared<KeepFirstCheckpoint>();
    rig.trainer->add_callback(keep);
    bool armed = true;
    HookGuard hook([&](const std::string& path) {
      if (armed && ends_with(path, "checkpoint-2.tmp/optimizer.safetensors")) {
        REQUIRE(fs::exists(out / "checkpoint-2.tmp" / "adapter" / "adapter_model.safetensors"));  // really partial
        throw Error("[drill] injected: No space left on device");
      }
    });
    REQUIRE_THROWS_WITH(rig.trainer->fit(),
                        ContainsSubstring("[checkpoint] writing " + (out / "checkpoint-2").string() + " failed") &&
                            ContainsSubstring("injected: No space left on device") &&
                            ContainsSubstring("the previous checkpoint " + (out / "checkpoint-1").string() + " is intact"));
    require_previous_intact(out, docs, seed, keep->files);
    // The failure left the trainer usable: with room again, the same step saves.
    armed = false;
    REQUIRE(rig.trainer->state().step == 2);
    REQUIRE(rig.trainer->save_checkpoint() == (out / "checkpoint-2").string());
    REQUIRE(test::read_file(out / "latest") == "checkpoint-2\n");
    REQUIRE(leftovers(out, ".tmp").empty());
  }

  SECTION("a real write error from the OS: the file size limit (EFBIG), which binds root too") {
    const fs::path out = root / "fsize";
    Rig rig = make_rig(docs, seed, drill_options(out, 3));
    auto keep = std::make_shared<KeepFirstCheckpoint>();
    rig.trainer->add_callback(keep);
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
    void (*old_handler)(int) = std::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG instead of killing us
    bool limited = false;
    HookGuard hook([&](const std::string& path) {
      if (ends_with(path, "checkpoint-2.tmp/adapter")) {  // only the second checkpoint's writes meet the limit
        rlimit small = saved;
        small.rlim_cur = 64;
        REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
        limited = true;
      }
    });
    std::string message;
    try {
      rig.trainer->fit();
    } catch (const Error& e) {
      message = e.what();
    }
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &saved) == 0);
    std::signal(SIGXFSZ, old_handler);
    REQUIRE(limited);
    INFO(message);
    REQUIRE_THAT(message, ContainsSubstring("[checkpoint] writing " + (out / "checkpoint-2").string() + " failed") &&
                              ContainsSubstring(std::strerror(EFBIG)) &&
                              ContainsSubstring(out.string() + "/checkpoint-2.tmp/adapter/adapter_model.safetensors") &&
                              ContainsSubstring("the previous checkpoint " + (out / "checkpoint-1").string() + " is intact"));
    require_previous_intact(out, docs, seed, keep->files);
  }
  fs::remove_all(root);
}

TEST_CASE("trainer drills: a read-only output folder fails the checkpoint with the OS reason", "[trainer][drills]") {
  if (::geteuid() == 0) SKIP("running as root: permissions do not stop writes (the EFBIG and injected drills cover it)");
  const fs::path root = test::scratch_dir("drills", "readonly");
  const auto docs = test::random_documents(16, test_seed(4), 4096);
  const uint64_t seed = test_seed(5);
  const fs::path out = root / "run";
  Rig rig = make_rig(docs, seed, drill_options(out, 3));
  auto keep = std::make_shared<KeepFirstCheckpoint>();
  rig.trainer->add_callback(keep);
  struct ReadOnlyAfterFirst : train::Callback {
    explicit ReadOnlyAfterFirst(fs::path dir) : dir_(std::move(dir)) {}
    void on_save(train::Trainer&, const train::SaveInfo& info) override {
      if (info.step == 1) fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
    }
    fs::path dir_;
  };
  rig.trainer->add_callback(std::make_shared<ReadOnlyAfterFirst>(out));
  std::string message;
  try {
    rig.trainer->fit();
  } catch (const Error& e) {
    message = e.what();
  }
  fs::permissions(out, fs::perms::owner_all);
  INFO(message);
  REQUIRE_THAT(message, ContainsSubstring("[checkpoint] writing " + (out / "checkpoint-2").string() + " failed") &&
                            ContainsSubstring(std::strerror(EACCES)) &&
                            ContainsSubstring("the previous checkpoint " + (out / "checkpoint-1").string() + " is intact"));
  require_previous_intact(out, docs, seed, keep->files);
  fs::remove_all(root);
}

// ---- kill -9 mid-checkpoint: a child process (this test binary, exec'd into the hidden test below)
// trains with a save every step and blocks in the checkpoint write hook at a chosen path; the parent
// kills it with SIGKILL there and resumes from what is on disk.

namespace {

// The child's side: KILN_DRILL_OUTPUT (the run folder), KILN_DRILL_PAUSE_AT (the path tail to stop at),
// KILN_DRILL_FD (the pipe to say "I am there" on), KILN_DRILL_RESAVE (resume, then save that step again).
const char* drill_env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// Runs the hidden child test with the same Catch seed and waits until it blocks at `pause_at`, then
// kills it with SIGKILL. Returns false when the child never got there.
bool run_child_and_kill(const fs::path& output, const std::string& pause_at, bool resave) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  // Everything the child needs is built before fork (the child makes only async-signal-safe calls).
  const std::string seed = std::to_string(Catch::getSeed());
  std::vector<std::string> env{"KILN_DRILL_OUTPUT=" + output.string(), "KILN_DRILL_PAUSE_AT=" + pause_at,
                               "KILN_DRILL_FD=" + std::to_string(fds[1]),
                               std::string("KILN_DRILL_RESAVE=") + (resave ? "1" : "0")};
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "KILN_DRILL_", 11) != 0) env.emplace_back(*e);
  std::vector<char*> envp;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const char* argv[] = {"kiln_tests", "trainer drills: (child) train and block mid-checkpoint", "--rng-seed", seed.c_str(),
                        nullptr};
  const int devnull = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  REQUIRE(devnull >= 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    ::dup2(devnull, STDOUT_FILENO);  // the child's Catch report is not ours
    ::execve("/proc/self/exe", const_cast<char* const*>(argv), envp.data());
    ::_exit(127);
  }
  ::close(devnull);
  ::close(fds[1]);
  pollfd p{fds[0], POLLIN, 0};
  char byte = 0;
  const bool arrived = ::poll(&p, 1, 300000) == 1 && ::read(fds[0], &byte, 1) == 1 && byte == 'k';
  ::close(fds[0]);
  ::kill(pid, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  if (arrived) {
    REQUIRE(WIFSIGNALED(status));
    REQUIRE(WTERMSIG(status) == SIGKILL);
  }
  return arrived;
}

}  // namespace

TEST_CASE("trainer drills: (child) train and block mid-checkpoint", "[.][drills-child]") {
  const std::string output = drill_env("KILN_DRILL_OUTPUT"), pause_at = drill_env("KILN_DRILL_PAUSE_AT");
  if (output.empty()) SKIP("run by the kill -9 drill, which sets KILN_DRILL_*");
  const int fd = std::atoi(drill_env("KILN_DRILL_FD"));
  const auto docs = test::random_documents(16, test_seed(6), 4096);
  Rig rig = make_rig(docs, test_seed(7), drill_options(output, 3));
  bool armed = false;  // from the first path of checkpoint-2 on (checkpoint-1's save passes the same tails)
  HookGuard hook([&](const std::string& path) {
    armed = armed || path.find("checkpoint-2") != std::string::npos;
    if (!armed || !ends_with(path, pause_at)) return;
    const char k = 'k';
    if (::write(fd, &k, 1) != 1) std::abort();
    for (;;) ::pause();  // until SIGKILL
  });
  if (std::string(drill_env("KILN_DRILL_RESAVE")) == "1") {
    REQUIRE(rig.trainer->resume_latest().has_value());
    rig.trainer->save_checkpoint();
  } else {
    rig.trainer->fit();
  }
  FAIL("the checkpoint write never reached " << pause_at);
}

TEST_CASE("trainer drills: kill -9 during a checkpoint write; resume starts from the last complete checkpoint",
          "[trainer][drills]") {
  const fs::path root = test::scratch_dir("drills", "kill");
  const auto docs = test::random_documents(16, test_seed(6), 4096);
  const uint64_t seed = test_seed(7);
  // The uninterrupted run every resumed one must match, loss for loss.
  const train::FitResult reference = make_rig(docs, seed, drill_options(root / "reference", 3)).trainer->fit();
  REQUIRE(reference.losses.size() == 3);

  // Resumes <output> in this process, checks the step it starts from and finishes the run: steps after
  // the resumed one equal the reference bit for bit, and nothing partial is left.
  auto resume_and_finish = [&](const fs::path& out, const std::string& want_dir, int64_t want_step) {
    Rig rig = make_rig(docs, seed, drill_options(out, 3));
    REQUIRE(rig.trainer->resume_latest() == want_dir);
    REQUIRE(rig.trainer->state().step == want_step);
    const train::FitResult r = rig.trainer->fit();
    REQUIRE(r.last_step == 3);
    REQUIRE(r.losses == std::vector<double>(reference.losses.begin() + want_step, reference.losses.end()));
    REQUIRE(test::read_file(out / "latest") == "checkpoint-3\n");
    REQUIRE(leftovers(out, ".tmp").empty());
    REQUIRE(leftovers(out, ".old").empty());
  };

  struct Drill {
    const char* name;
    const char* pause_at;  // the path tail the child is killed at
  };
  for (const Drill d : {Drill{"partial", "checkpoint-2.tmp/optimizer.safetensors"},  // adapter written, the rest not
                        Drill{"before-state", "checkpoint-2.tmp/trainer_state.json"},
                        Drill{"before-rename", "/checkpoint-2"},   // the .tmp folder is complete, not in place
                        Drill{"before-latest", "/latest"}}) {     // checkpoint-2 in place, latest not yet moved
    DYNAMIC_SECTION("killed at " << d.name) {
      const fs::path out = root / d.name;
      REQUIRE(run_child_and_kill(out, d.pause_at, false));
      REQUIRE(test::read_file(out / "latest") == "checkpoint-1\n");  // latest moves last: it still names the complete one
      REQUIRE(fs::exists(out / (std::string(d.name) == "before-latest" ? "checkpoint-2" : "checkpoint-2.tmp")));
      resume_and_finish(out, (out / "checkpoint-1").string(), 1);
    }
  }

  SECTION("killed while saving again a step whose folder exists (the old one is aside as .old)") {
    const fs::path out = root / "resave";
    REQUIRE(make_rig(docs, seed, drill_options(out, 2)).trainer->fit().last_step == 2);
    const auto saved = snapshot(out / "checkpoint-2");
    REQUIRE(run_child_and_kill(out, "/checkpoint-2", true));  // after checkpoint-2 -> checkpoint-2.old
    REQUIRE(test::read_file(out / "latest") == "checkpoint-2\n");
    REQUIRE_FALSE(fs::exists(out / "checkpoint-2"));
    REQUIRE(snapshot(out / "checkpoint-2.old") == saved);
    resume_and_finish(out, (out / "checkpoint-2.old").string(), 2);
  }
  fs::remove_all(root);
}

// ---- NaN / inf

namespace {

// The default loss, poisoned on chosen calls (one call per step: grad_accum 1): "inf-loss" multiplies the
// loss by inf; "nan-grad" adds sum(sqrt(0 * p)) for the parameter `victim` (0 in the loss, NaN in its
// gradient: d sqrt(u)/du = inf at 0, times du/dp = 0), leaving the loss and every other gradient finite.
struct Poison {
  std::map<int, std::string> at;  // call number (from 1) -> "inf-loss" | "nan-grad"
  std::string victim;
  int calls = 0;
};

train::BatchLossFn poisoned_loss(std::shared_ptr<Poison> poison) {
  return [poison, base = train::llama_loss(true)](nn::Module& model, const data::Batch& b) {
    Tensor loss = base(model, b);
    const auto it = poison->at.find(++poison->calls);
    if (it == poison->at.end()) return loss;
    if (it->second == "inf-loss") return mul(loss, INFINITY);
    for (const auto& [name, p] : model.named_trainable_parameters())
      if (name == poison->victim) return add(loss, sum(sqrt(mul(p, 0.0))));
    FAIL("no parameter " << poison->victim);
    return loss;
  };
}

std::vector<std::vector<float>> trainable_values(nn::Module& model) {
  std::vector<std::vector<float>> out;
  for (const auto& [name, p] : model.named_trainable_parameters()) out.push_back(p.to_vector<float>());
  return out;
}

bool all_finite(nn::Module& model) {
  for (const auto& v : trainable_values(model))
    for (float x : v)
      if (!std::isfinite(x)) return false;
  return true;
}

struct SkipLog : train::Callback {
  void on_step_skipped(train::Trainer&, const train::StepInfo& s) override { reasons.push_back(s.skip_reason); }
  void on_step_end(train::Trainer&, const train::StepInfo& s) override { REQUIRE_FALSE(s.skipped); }
  std::vector<std::string> reasons;
};

}  // namespace

TEST_CASE("trainer drills: a NaN/inf loss or gradient stops with the step and the tensor, or is skipped and counted",
          "[trainer][drills]") {
  const fs::path root = test::scratch_dir("drills", "nonfinite");
  const auto docs = test::random_documents(16, test_seed(8), 4096);
  const uint64_t seed = test_seed(9);
  auto poison = std::make_shared<Poison>();
  auto options = [&](const std::string& out, int64_t steps) {
    train::TrainerOptions o = drill_options(root / out, steps);
    o.save_every = 0;
    o.loss = poisoned_loss(poison);
    return o;
  };
  {  // a parameter from the middle of the list, so the culprit search has to find it
    Rig probe = make_rig(docs, seed, options("probe", 1));
    const auto params = probe.model->named_trainable_parameters();
    REQUIRE(params.size() > 4);
    poison->victim = params[params.size() / 2].first;
  }

  SECTION("default: a NaN gradient stops the run naming the step and the parameter, before any update") {
    for (const double clip : {1.0, 0.0}) {  // with clip off the norm is still measured for the check
      poison->calls = 0;
      poison->at = {{3, "nan-grad"}};
      train::TrainerOptions o = options("stop-grad", 5);
      o.clip = clip;
      Rig rig = make_rig(docs, seed, o);
      REQUIRE_THROWS_WITH(rig.trainer->fit(), ContainsSubstring("[trainer] step 3: the gradient of '" + poison->victim +
                                                                "' holds nan (the loss is ") &&
                                                  ContainsSubstring("the weights are those after step 2") &&
                                                  ContainsSubstring("skip_nonfinite_steps"));
      REQUIRE(rig.trainer->state().step == 2);
      REQUIRE(rig.optimizer->step_count() == 2);
      REQUIRE(all_finite(*rig.model));
      for (const auto& [name, p] : rig.model->named_trainable_parameters()) {  // no NaN gradient left behind
        const Tensor g = p.grad();
        if (g.defined())
          for (float x : g.to_vector<float>()) REQUIRE(x == 0.0f);
      }
    }
  }

  SECTION("default: an inf loss stops the run naming the step and the loss") {
    poison->calls = 0;
    poison->at = {{2, "inf-loss"}};
    Rig rig = make_rig(docs, seed, options("stop-loss", 5));
    REQUIRE_THROWS_WITH(rig.trainer->fit(), ContainsSubstring("[trainer] step 2: the loss is inf"));
    REQUIRE(rig.trainer->state().step == 1);
    REQUIRE(all_finite(*rig.model));
  }

  SECTION("skip_nonfinite_steps: no update, counted, reported, saved; training goes on") {
    poison->calls = 0;
    poison->at = {{2, "inf-loss"}, {4, "nan-grad"}};
    train::TrainerOptions o = options("skip", 4);
    o.skip_nonfinite_steps = true;
    Rig rig = make_rig(docs, seed, o);
    auto log = std::make_shared<SkipLog>();
    rig.trainer->add_callback(log);

    REQUIRE_FALSE(rig.trainer->train_step()->skipped);  // call 1
    const auto before = trainable_values(*rig.model);
    const std::optional<train::StepInfo> s = rig.trainer->train_step();  // call 2: inf loss
    REQUIRE(s->skipped);
    REQUIRE(s->step == 2);
    REQUIRE_THAT(s->skip_reason, ContainsSubstring("step 2: the loss is inf"));
    REQUIRE(trainable_values(*rig.model) == before);  // no update (AdamW with lr 1e-2 would move every weight)
    REQUIRE(rig.optimizer->step_count() == 1);
    REQUIRE(rig.trainer->state().step == 1);
    REQUIRE(rig.trainer->state().skipped_steps == 1);

    const train::FitResult r = rig.trainer->fit();  // call 3: step 2; call 4: NaN gradient (skipped); 5, 6: steps 3, 4
    REQUIRE(r.skipped_steps == 1);
    REQUIRE(r.losses.size() == 3);
    for (double l : r.losses) REQUIRE(std::isfinite(l));
    REQUIRE(log->reasons.size() == 1);
    REQUIRE_THAT(log->reasons[0], ContainsSubstring("step 3: the gradient of '" + poison->victim + "' holds nan"));
    REQUIRE(rig.trainer->state().step == 4);
    REQUIRE(rig.trainer->state().skipped_steps == 2);
    REQUIRE(rig.optimizer->step_count() == 4);
    REQUIRE(all_finite(*rig.model));
    // The count is part of the checkpoint and comes back on resume.
    Rig back = make_rig(docs, seed, o);
    REQUIRE(back.trainer->resume_latest().has_value());
    REQUIRE(back.trainer->state().skipped_steps == 2);
  }

  SECTION("skip_nonfinite_steps gives up when every step is non-finite") {
    poison->calls = 0;
    poison->at.clear();
    for (int i = 1; i <= 40; ++i) poison->at[i] = "inf-loss";
    train::TrainerOptions o = options("hopeless", 30);
    o.skip_nonfinite_steps = true;
    Rig rig = make_rig(docs, seed, o);
    REQUIRE_THROWS_WITH(rig.trainer->fit(), ContainsSubstring("[trainer] step 1: the loss is inf") &&
                                                ContainsSubstring("the 16 steps before it were skipped"));
    REQUIRE(poison->calls == 17);
    REQUIRE(rig.trainer->state().step == 0);
  }
  fs::remove_all(root);
}

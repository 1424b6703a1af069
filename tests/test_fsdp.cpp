// fully_shard on the local backend (ranks as CPU threads): a QLoRA Llama trained at worlds 2, 3 and 4
// (with accumulation, activation checkpointing, no prefetch) gives one process's losses, eval losses and
// adapter; gathered NF4 bytes equal the unsharded ones; sharded checkpoints resume at other world sizes;
// the end of the data in lockstep; the sharded PEFT adapter; ranks with different models fail at once.
#include <catch2/catch_get_random_seed.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include "io/safetensors.h"
#include "nn/generate.h"
#include "tests/helpers.h"
#include "tests/test_fsdp_common.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

uint64_t seed_for(uint64_t k) { return data::mix_seed(Catch::getSeed(), k); }

void require_same_losses(const std::vector<double>& got, const std::vector<double>& want, size_t from = 0) {
  REQUIRE(got.size() + from == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i + from, got[i], want[i + from]);
    CHECK(std::abs(got[i] - want[i + from]) <= 1e-5 * std::abs(want[i + from]));
  }
}

// Per tensor, relative to its norm: ||got - want|| <= rtol ||want|| (one element of an Adam-trained
// tensor may move by more, relative to itself, when the rounding of its sums differs).
void require_same_adapter(const nn::StateDict& got, const nn::StateDict& want, double rtol = 1e-5) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (const auto& [name, t] : want) {
    CAPTURE(name);
    REQUIRE(got.count(name));
    REQUIRE(got.at(name).shape() == t.shape());
    const double diff = sum(square(sub(got.at(name).to(DType::f64), t.to(DType::f64)))).item<double>();
    const double norm = sum(square(t.to(DType::f64))).item<double>();
    CAPTURE(std::sqrt(diff), std::sqrt(norm));
    CHECK(std::sqrt(diff) <= rtol * std::sqrt(norm));
    if (norm > 0) worst = std::max(worst, std::sqrt(diff / norm));
  }
  UNSCOPED_INFO("worst relative adapter difference " << worst);
}

// The bytes of a tensor (any dtype) on the host.
std::vector<uint8_t> bytes_of(const Tensor& t) {
  Tensor c = t.to(kCPU).contiguous();
  std::vector<uint8_t> out(c.nbytes());
  if (!out.empty()) std::memcpy(out.data(), c.raw_data(), out.size());
  return out;
}

}  // namespace

TEST_CASE("fully_shard: a QLoRA Llama at worlds 2, 3 and 4 trains as one process on the same global batch", "[dist]") {
  const auto docs = test::fsdp_docs(60, seed_for(1));
  test::FsdpRun ref;
  ref.world = 1;
  ref.shard = false;
  ref.seed = seed_for(2);
  ref.eval_docs = test::fsdp_docs(6, seed_for(3));
  const test::FsdpResult want = test::fsdp_train(docs, ref);
  REQUIRE(want.losses.size() == 20);
  REQUIRE(want.eval_losses.size() == 2);
  // Training moved the adapters (lora_B starts at zero).
  REQUIRE(sum(abs(want.adapter.at("model.layers.1.mlp.down_proj.lora_B.weight"))).item<double>() > 0);

  struct Case {
    const char* what;
    int world;
    int64_t batch, grad_accum;
    bool shard = true, checkpointing = false, reshard_after_forward = true;
    int prefetch = 1;
  };
  const std::vector<Case> cases = {
      {"world 2, 2 micro-batches, gathered through forward and backward", 2, 3, 2, true, false, false},
      {"world 3, activation checkpointing (gathers again in recompute)", 3, 4, 1, true, true},
      {"world 4, no prefetch", 4, 3, 1, true, false, true, 0},
      {"world 2, plain data parallel", 2, 6, 1, false},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    test::FsdpRun run = ref;
    run.world = c.world;
    run.shard = c.shard;
    run.batch = c.batch;
    run.grad_accum = c.grad_accum;
    run.checkpointing = c.checkpointing;
    run.fsdp.reshard_after_forward = c.reshard_after_forward;
    run.fsdp.prefetch = c.prefetch;
    const test::FsdpResult got = test::fsdp_train(docs, run);
    require_same_losses(got.losses, want.losses);
    require_same_losses(got.eval_losses, want.eval_losses);
    // The adapter against the batch of 12: f32 sums split differently move a few Adam-trained tensors by up
    // to ~6e-5 of their norm in 20 steps (one process accumulating 4 micro-batches of 3 moves exactly as far
    // as world 4 does). Against one process accumulating the same micro-batches in the order the ranks'
    // reduction sums them (rank by rank), the difference is rounding only.
    require_same_adapter(got.adapter, want.adapter, test::kAcrossSplits);
    if (c.grad_accum == 1) {
      test::FsdpRun same = ref;
      same.batch = c.batch;
      same.grad_accum = c.world;
      require_same_adapter(got.adapter, test::fsdp_train(docs, same).adapter, 1e-6);
    }
  }
}

TEST_CASE("fully_shard: gradients reduced in bf16 stay close to the f32 run", "[dist]") {
  const auto docs = test::fsdp_docs(40, seed_for(12));
  test::FsdpRun run;
  run.world = 2;
  run.batch = 6;
  run.steps = 8;
  run.seed = seed_for(13);
  const test::FsdpResult f32 = test::fsdp_train(docs, run);
  run.fsdp.reduce_dtype = DType::bf16;
  const test::FsdpResult bf16 = test::fsdp_train(docs, run);
  REQUIRE(bf16.losses.size() == f32.losses.size());
  for (size_t i = 0; i < f32.losses.size(); ++i) {
    CAPTURE(i, bf16.losses[i], f32.losses[i]);
    CHECK(std::abs(bf16.losses[i] - f32.losses[i]) <= 5e-3 * f32.losses[i]);
  }
  // Adam normalises every gradient, so bf16 rounding of small sums moves a few percent of each tensor.
  require_same_adapter(bf16.adapter, f32.adapter, 0.15);
  // ... and they did go through bf16: the adapters are not the f32 run's.
  double moved = 0;
  for (const auto& [name, t] : f32.adapter) moved += sum(abs(sub(bf16.adapter.at(name), t))).item<double>();
  CHECK(moved > 0);
}

TEST_CASE("llama3.1-70b: the named config holds Meta's config.json values", "[dist]") {
  const nn::LlamaConfig c = nn::LlamaConfig::named("llama3.1-70b");
  CHECK(c.hidden_size == 8192);
  CHECK(c.intermediate_size == 28672);
  CHECK(c.num_hidden_layers == 80);
  CHECK(c.num_attention_heads == 64);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 128);
  CHECK(c.vocab_size == 128256);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.max_position_embeddings == 131072);
  CHECK(c.rms_norm_eps == 1e-5);
  REQUIRE(c.rope_scaling.has_value());
  CHECK(c.rope_scaling->factor == 8.0);
  CHECK(c.rope_scaling->low_freq_factor == 1.0);
  CHECK(c.rope_scaling->high_freq_factor == 4.0);
  CHECK(c.rope_scaling->original_max_position_embeddings == 8192);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.torch_dtype == DType::bf16);
  CHECK(c.num_parameters() == 70553706496);  // the published parameter count of Llama 3.1 70B
}

TEST_CASE("fully_shard: every rank's gathered NF4 weight is byte-identical to the unsharded one", "[dist]") {
  const uint64_t seed = seed_for(4);
  auto reference = test::fsdp_model(seed);
  std::map<std::string, std::vector<uint8_t>> want;
  for (const auto& [name, t] : reference->named_buffers()) want[name] = bytes_of(t);
  std::map<std::string, float> offsets;
  for (auto& [path, m] : reference->named_modules())
    if (auto* q = dynamic_cast<nn::NF4Linear*>(m)) offsets[path] = q->weight().offset;
  REQUIRE(want.size() >= 2 * 7 * 4);

  for (int world : {2, 3}) {
    CAPTURE(world);
    std::mutex mutex;
    std::vector<std::string> problems;
    size_t checked = 0;
    auto note = [&](const std::string& p) {
      std::lock_guard<std::mutex> lock(mutex);
      problems.push_back(p);
    };
    dist::run_local(world, [&](dist::ProcessGroup& pg) {
      auto model = test::fsdp_model(seed);
      dist::FullyShardOptions o;
      o.replicate_below = 0;  // even the one-element nested absmax is split (and padded)
      auto root = dist::shard_llama(*model, std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {}), o);
      // Between uses every sharded tensor holds ceil(rows / world) rows; the offset never leaves the module.
      for (const auto& u : root->schedule_units()) {
        for (const dist::FsdpTensor& t : u->tensors())
          if (!t.replicated && t.tensor.shape() != t.shard_shape()) note(t.name + ": not a shard between uses");
        if (u->local_bytes() * static_cast<size_t>(world) > u->full_bytes() + 4096u * static_cast<size_t>(world))
          note(u->path() + ": holds more than its share");
      }
      // Gathered explicitly, and as forward sees it (a pre hook on each NF4 layer of the model).
      auto compare = [&](const std::string& path, nn::Module& m) {
        for (const auto& [name, t] : m.named_buffers()) {
          const std::string key = path + "." + name;
          const auto got = bytes_of(t);
          if (got != want.at(key)) {
            size_t i = 0;
            while (i < got.size() && i < want.at(key).size() && got[i] == want.at(key)[i]) ++i;
            note(fmt::format("rank {}: {} differs at byte {} of {} ({})", pg.rank(), key, i, got.size(), shape_str(t.shape())));
          }
          std::lock_guard<std::mutex> lock(mutex);
          ++checked;
        }
        if (dynamic_cast<nn::NF4Linear&>(m).weight().offset != offsets.at(path)) note(path + ": offset differs");
      };
      std::vector<HookHandle> hooks;
      for (auto& [path, m] : model->named_modules()) {
        if (dynamic_cast<nn::NF4Linear*>(m) == nullptr) continue;
        const std::string p = path;
        hooks.push_back(m->register_forward_pre_hook([&compare, p](nn::Module& mod, nn::Module::ForwardCall&) { compare(p, mod); }));
      }
      (*model)(from_vector<int64_t>({5, 6, 7, 8}, {1, 4}));
      for (HookHandle& h : hooks) h.remove();
      for (const auto& u : root->schedule_units()) {
        if (u->is_root()) continue;  // its module holds the layers, which are the other units'
        u->unshard();
        for (auto& [path, m] : u->module().named_modules())
          if (dynamic_cast<nn::NF4Linear*>(m) != nullptr) compare(u->path().empty() ? path : u->path() + "." + path, *m);
        u->reshard();
      }
    });
    CAPTURE(problems);
    REQUIRE(problems.empty());
    REQUIRE(checked == 2 * want.size() * static_cast<size_t>(world));
  }
}

TEST_CASE("fully_shard: generation (KV cache, no grad) from the sharded model gives the unsharded model's tokens",
          "[dist]") {
  const uint64_t seed = seed_for(11);
  nn::GenerateOptions go;
  go.max_new_tokens = 8;  // greedy
  const std::vector<int64_t> prompt{5, 6, 7, 8, 9};
  const std::vector<int64_t> want = nn::generate(*test::fsdp_model(seed), prompt, go);
  std::vector<std::vector<int64_t>> got(3);
  dist::run_local(3, [&](dist::ProcessGroup& pg) {
    auto model = test::fsdp_model(seed);
    auto root = dist::shard_llama(*model, std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {}));
    got[static_cast<size_t>(pg.rank())] = nn::generate(*model, prompt, go);
    // Without a backward the root stays gathered (its lm_head serves the logits after forward); reshard frees it.
    KILN_CHECK(root->state() == dist::FsdpUnit::State::gathered, "test", "expected the root gathered");
    root->reshard();
    for (const auto& u : root->schedule_units())
      KILN_CHECK(u->state() == dist::FsdpUnit::State::sharded, "test", "expected {} sharded", u->path());
  });
  for (const auto& g : got) REQUIRE(g == want);
}

TEST_CASE("fully_shard: a sharded checkpoint resumes at another world size (2 -> 3, 4 -> 1) as the uninterrupted run",
          "[dist]") {
  const fs::path root = test::scratch_dir("fsdp", "resume");
  const auto docs = test::fsdp_docs(40, seed_for(5));
  test::FsdpRun ref;
  ref.world = 1;
  ref.shard = false;
  ref.steps = 6;
  ref.seed = seed_for(6);
  const test::FsdpResult want = test::fsdp_train(docs, ref);

  struct Case {
    int first_world, second_world;
  };
  for (const Case c : {Case{2, 3}, Case{4, 1}}) {
    CAPTURE(c.first_world, c.second_world);
    const fs::path out = root / fmt::format("{}to{}", c.first_world, c.second_world);
    test::FsdpRun first = ref;
    first.shard = true;
    first.world = c.first_world;
    first.batch = 12 / c.first_world;
    first.steps = 3;
    first.output = out.string();
    const test::FsdpResult a = test::fsdp_train(docs, first);
    require_same_losses(a.losses, {want.losses.begin(), want.losses.begin() + 3});
    const fs::path ckpt = out / "checkpoint-3";
    REQUIRE(test::read_file(out / "latest") == "checkpoint-3\n");
    for (int r = 0; r < c.first_world; ++r)
      REQUIRE(fs::exists(ckpt / "shards" / fmt::format("rank-{:05d}-of-{:05d}.safetensors", r, c.first_world)));
    REQUIRE(fs::exists(ckpt / "trainer_state.json"));
    REQUIRE_FALSE(fs::exists(out / "checkpoint-3.tmp"));

    test::FsdpRun second = first;
    second.world = c.second_world;
    second.batch = 12 / c.second_world;
    second.steps = 6;
    second.resume = true;
    const test::FsdpResult b = test::fsdp_train(docs, second);
    require_same_losses(b.losses, want.losses, 3);
    require_same_adapter(b.adapter, want.adapter, test::kAcrossSplits);  // sums split otherwise than the batch of 12 (see above)
  }

  // A checkpoint missing a rank's shard is refused, naming the file.
  test::FsdpRun other = ref;
  other.shard = true;
  other.world = 2;
  other.batch = 6;
  other.steps = 6;
  other.resume = true;
  other.output = (root / "2to3").string();
  other.seed = seed_for(6);
  fs::remove_all(root / "2to3" / "checkpoint-6");
  train::set_latest_checkpoint(other.output, "checkpoint-3");
  fs::remove(root / "2to3" / "checkpoint-3" / "shards" / "rank-00001-of-00002.safetensors");
  REQUIRE_THROWS_WITH(test::fsdp_train(docs, other), ContainsSubstring("rank-00001-of-00002.safetensors"));
  fs::remove_all(root);
}

TEST_CASE("fully_shard: at the end of the data, ranks short of a micro-batch run one without loss tokens", "[dist]") {
  // Documents whose epoch ends with a partial step in which rank 3 (at least) gets no batch of 3 rows.
  std::vector<data::Document> docs;
  int64_t rows = 0;
  for (uint64_t k = 0;; ++k) {
    docs = test::fsdp_docs(8, seed_for(70 + k));
    data::PackOptions po;
    po.seq_len = 8;
    rows = data::PackedDataset(docs, po).rows_per_epoch();
    if (rows % 12 > 0 && rows % 12 <= 9) break;
  }
  CAPTURE(rows);
  test::FsdpRun ref;
  ref.world = 1;
  ref.shard = false;
  ref.steps = 0;
  ref.epochs = 1;
  ref.seed = seed_for(8);
  const test::FsdpResult want = test::fsdp_train(docs, ref);
  REQUIRE(static_cast<int64_t>(want.losses.size()) == (rows + 11) / 12);
  test::FsdpRun run = ref;
  run.shard = true;
  run.world = 4;
  run.batch = 3;
  const test::FsdpResult got = test::fsdp_train(docs, run);
  require_same_losses(got.losses, want.losses);
  require_same_adapter(got.adapter, want.adapter, test::kAcrossSplits);
}

TEST_CASE("fully_shard: rank 0 writes the PEFT adapter of the sharded model as one process writes its own", "[dist]") {
  const fs::path root = test::scratch_dir("fsdp", "adapter");
  const auto docs = test::fsdp_docs(20, seed_for(9));
  test::FsdpRun ref;
  ref.world = 1;
  ref.shard = false;
  ref.steps = 3;
  ref.seed = seed_for(10);
  ref.batch = 4;
  ref.grad_accum = 3;  // the rows of world 3, summed in the order the ranks' reduction sums them
  ref.adapter_dir = (root / "single").string();
  test::fsdp_train(docs, ref);
  test::FsdpRun run = ref;
  run.shard = true;
  run.world = 3;
  run.grad_accum = 1;
  run.adapter_dir = (root / "sharded").string();
  test::fsdp_train(docs, run);
  REQUIRE(test::read_file(root / "sharded" / "adapter_config.json") == test::read_file(root / "single" / "adapter_config.json"));
  const auto a = io::SafetensorsFile::open((root / "sharded" / "adapter_model.safetensors").string());
  const auto b = io::SafetensorsFile::open((root / "single" / "adapter_model.safetensors").string());
  REQUIRE(a.keys() == b.keys());
  REQUIRE(a.keys().size() == 2 * 7 * 2);
  nn::StateDict got, want;
  for (const std::string& k : a.keys()) {
    got[k] = a.get(k);
    want[k] = b.get(k);
  }
  require_same_adapter(got, want, 1e-6);
  fs::remove_all(root);
}

TEST_CASE("fully_shard: ranks that build different models fail at the start, naming the difference", "[dist]") {
  REQUIRE_THROWS_WITH(dist::run_local(2,
                                      [&](dist::ProcessGroup& pg) {
                                        auto model = test::fsdp_model(1, kCPU, pg.rank() == 0 ? 4 : 8);
                                        dist::shard_llama(*model, std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {}));
                                      }),
                      ContainsSubstring("fully_shard layout") && ContainsSubstring("differs across ranks"));
  // One module sharded twice, and a unit over a tensor a unit below already owns.
  dist::run_local(1, [&](dist::ProcessGroup& pg) {
    auto group = std::shared_ptr<dist::ProcessGroup>(&pg, [](dist::ProcessGroup*) {});
    auto model = test::fsdp_model(1);
    auto& layer = model->model().child_as<nn::ModuleList>("layers").at<nn::LlamaDecoderLayer>(0);
    dist::fully_shard(layer, group);
    REQUIRE_THROWS_WITH(dist::fully_shard(layer, group), ContainsSubstring("already sharded"));
  });
}


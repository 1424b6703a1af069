// Sharded checkpoints (see sharded_checkpoint.h): each rank's shard file, rank 0's trainer state and the
// barriers that make the folder appear complete or not at all; the resume that rebuilds every tensor
// from the shards of whatever world wrote them and takes this rank's rows; the gathered PEFT adapter.
#include "dist/sharded_checkpoint.h"

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "autograd/grad_mode.h"
#include "core/file_io.h"
#include "core/json_int.h"
#include "core/ops.h"
#include "io/safetensors.h"

namespace kiln::dist {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kShardFormat = "kiln-fsdp-shard-1";
constexpr const char* kFolderFormat = "kiln-fsdp-checkpoint-1";
constexpr const char* kOptimizerPrefix = "optimizer/";

std::string shard_file(int rank, int world) { return fmt::format("rank-{:05d}-of-{:05d}.safetensors", rank, world); }

// The units' tensors by impl.
std::map<const TensorImpl*, const FsdpTensor*> entries_of(FsdpUnit& root) {
  std::map<const TensorImpl*, const FsdpTensor*> m;
  for (const auto& u : root.schedule_units())
    for (const FsdpTensor& t : u->tensors()) m[t.tensor.impl().get()] = &t;
  return m;
}

const FsdpTensor& entry_for(const std::map<const TensorImpl*, const FsdpTensor*>& entries, const std::string& name,
                            const Tensor& p) {
  auto it = entries.find(p.impl().get());
  KILN_CHECK(it != entries.end(), "sharded checkpoint", "parameter '{}' is not sharded by fully_shard", name);
  return *it->second;
}

std::string meta(const io::SafetensorsFile& f, const std::string& key) {
  auto it = f.metadata().find(key);
  KILN_CHECK(it != f.metadata().end(), "sharded checkpoint", "{}: metadata has no '{}' (not a kiln shard file)", f.path(), key);
  return it->second;
}

// The shard files of a checkpoint folder, checked against each other.
struct ShardSet {
  std::vector<io::SafetensorsFile> files;
  json shapes;  // name -> {"shape": [...], "replicated": bool}

  // The full tensor `key` (of parameter `name`'s full shape) from every file.
  Tensor full(const std::string& key, const std::string& name) const {
    const json& info = shapes.at(name);
    const Shape shape = info.at("shape").get<Shape>();
    for (const auto& f : files)
      KILN_CHECK(f.contains(key), "sharded checkpoint", "{}: expected tensor '{}', found none", f.path(), key);
    if (info.at("replicated").get<bool>()) return files[0].get(key);
    std::vector<Tensor> parts;
    for (const auto& f : files) parts.push_back(f.get(key));
    return join_shards(parts, shape);
  }
};

ShardSet open_shards(const fs::path& dir) {
  const fs::path index = dir / "sharded.json";
  KILN_CHECK(fs::exists(index), "sharded checkpoint", "{}: expected sharded.json, found none (not a sharded checkpoint)",
             dir.string());
  int world = 0;
  try {
    const json j = json::parse(read_file(index.string(), "sharded checkpoint"));
    KILN_CHECK(j.at("format").get<std::string>() == kFolderFormat, "sharded checkpoint", "{}: expected format '{}'",
               index.string(), kFolderFormat);
    const std::optional<int64_t> w = json_int(j.at("world_size"), 1, 1 << 20);
    KILN_CHECK(w, "sharded checkpoint", "{}: world_size must be an integer in [1, 2^20], found {}", index.string(),
               json_shown(j.at("world_size")));
    world = static_cast<int>(*w);
  } catch (const json::exception& e) {
    KILN_FAIL("sharded checkpoint", "{}: corrupt: {}", index.string(), e.what());
  }
  KILN_CHECK(world >= 1, "sharded checkpoint", "{}: expected a world size >= 1, found {}", index.string(), world);
  ShardSet s;
  for (int r = 0; r < world; ++r) {
    const fs::path p = dir / "shards" / shard_file(r, world);
    KILN_CHECK(fs::exists(p), "sharded checkpoint", "expected {} (rank {} of {}), found none", p.string(), r, world);
    s.files.push_back(io::SafetensorsFile::open(p.string()));
    const auto& f = s.files.back();
    KILN_CHECK(meta(f, "format") == kShardFormat && meta(f, "rank") == std::to_string(r) &&
                   meta(f, "world_size") == std::to_string(world),
               "sharded checkpoint", "{}: expected the shard of rank {} of {} ({}), found rank {} of {} ({})", p.string(),
               r, world, kShardFormat, meta(f, "rank"), meta(f, "world_size"), meta(f, "format"));
  }
  try {
    s.shapes = json::parse(meta(s.files[0], "tensors"));
  } catch (const json::exception& e) {
    KILN_FAIL("sharded checkpoint", "{}: corrupt tensor list: {}", s.files[0].path(), e.what());
  }
  return s;
}

}  // namespace

std::string save_sharded_checkpoint(const std::string& output, FsdpUnit& root, const nn::Optimizer& optimizer,
                                    const train::TrainerState& state) {
  ProcessGroup& group = root.group();
  const int rank = group.rank(), world = group.size();
  const std::string name = train::checkpoint_name(state.step);
  const fs::path final_dir = fs::path(output) / name, tmp = fs::path(output) / (name + ".tmp");
  if (rank == 0) {
    fs::remove_all(tmp);
    fs::create_directories(tmp / "shards");
  }
  group.barrier().wait();

  const auto entries = entries_of(root);
  std::vector<std::pair<std::string, Tensor>> tensors;
  json shapes = json::object();
  json params = json::array();
  for (const auto& [pname, p] : optimizer.parameters()) {
    const FsdpTensor& t = entry_for(entries, pname, p);
    tensors.emplace_back(pname, t.shard);
    shapes[pname] = {{"shape", t.shape}, {"replicated", t.replicated}};
    params.push_back(pname);
  }
  const nn::OptimizerState os = optimizer.state_dict();
  for (const auto& [key, v] : os.tensors) tensors.emplace_back(kOptimizerPrefix + key, v);
  json hyper = json::object();
  for (const auto& [k, v] : os.hyper) hyper[k] = v;
  const std::map<std::string, std::string> metadata{
      {"format", kShardFormat},           {"rank", std::to_string(rank)},     {"world_size", std::to_string(world)},
      {"tensors", shapes.dump()},         {"optimizer_type", os.type},        {"optimizer_step", std::to_string(os.step)},
      {"optimizer_hyper", hyper.dump()},  {"optimizer_params", params.dump()}};
  io::save_safetensors((tmp / "shards" / shard_file(rank, world)).string(), tensors, metadata);
  group.barrier().wait();

  if (rank == 0) {
    write_file_atomic((tmp / "trainer_state.json").string(), state.to_json(), "sharded checkpoint");
    write_file_atomic((tmp / "sharded.json").string(), json{{"format", kFolderFormat}, {"world_size", world}}.dump(1),
                      "sharded checkpoint");
    fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    train::set_latest_checkpoint(output, name);
  }
  group.barrier().wait();
  return final_dir.string();
}

train::TrainerState load_sharded_checkpoint(const std::string& dir, FsdpUnit& root, nn::Optimizer& optimizer,
                                            const std::string& fingerprint) {
  train::TrainerState state = train::read_trainer_state(dir, fingerprint);
  const ShardSet shards = open_shards(dir);
  const int rank = root.group().rank();
  for (const auto& u : root.schedule_units()) u->reshard();
  const auto entries = entries_of(root);

  // The parameters: the same names on both sides, the same full shapes.
  std::set<std::string> names;
  std::map<std::string, const FsdpTensor*> by_name;
  for (const auto& [pname, p] : optimizer.parameters()) {
    const FsdpTensor& t = entry_for(entries, pname, p);
    KILN_CHECK(shards.shapes.contains(pname), "sharded checkpoint", "{}: expected parameter '{}', found none", dir, pname);
    const Shape saved = shards.shapes.at(pname).at("shape").get<Shape>();
    KILN_CHECK(saved == t.shape, "sharded checkpoint", "{}: parameter '{}' has shape {} in the checkpoint, {} in the model",
               dir, pname, shape_str(saved), shape_str(t.shape));
    names.insert(pname);
    by_name[pname] = &t;
  }
  for (auto it = shards.shapes.begin(); it != shards.shapes.end(); ++it)
    KILN_CHECK(names.count(it.key()), "sharded checkpoint", "{}: holds parameter '{}', which the model does not train", dir,
               it.key());

  autograd::NoGradGuard no_grad;
  // This rank's rows of a tensor shaped like parameter `pname`, for the layout it has now.
  auto mine = [&](const std::string& key, const std::string& pname) {
    const FsdpTensor& t = *by_name.at(pname);
    Tensor full = shards.full(key, pname);
    return t.replicated ? full : take_shard(full, t.shard_rows, rank);
  };
  nn::OptimizerState os;
  const io::SafetensorsFile& first = shards.files[0];
  try {
    os.type = meta(first, "optimizer_type");
    os.step = std::stoll(meta(first, "optimizer_step"));
    const json hyper = json::parse(meta(first, "optimizer_hyper"));
    KILN_CHECK(hyper.is_object(), "sharded checkpoint", "{}: expected the hyperparameters as a JSON object", first.path());
    for (auto it = hyper.begin(); it != hyper.end(); ++it) os.hyper[it.key()] = it.value().get<double>();
    os.params = json::parse(meta(first, "optimizer_params")).get<std::vector<std::string>>();
  } catch (const kiln::Error&) {
    throw;
  } catch (const std::exception& e) {
    KILN_FAIL("sharded checkpoint", "{}: corrupt optimizer metadata: {}", first.path(), e.what());
  }
  for (const std::string& key : first.keys()) {
    if (key.rfind(kOptimizerPrefix, 0) != 0) continue;
    const std::string k = key.substr(std::string(kOptimizerPrefix).size());
    const size_t dot = k.rfind('.');
    const std::string pname = dot == std::string::npos ? k : k.substr(0, dot);
    KILN_CHECK(by_name.count(pname), "sharded checkpoint", "{}: optimizer state '{}' names no trained parameter", dir, k);
    os.tensors[k] = k.substr(dot + 1) == "step" ? first.get(key) : mine(key, pname);
  }
  optimizer.load_state_dict(os);  // checks every tensor before changing anything
  for (const auto& [pname, t] : by_name) copy_(t->shard, mine(pname, pname));
  KILN_CHECK(optimizer.step_count() == state.step, "sharded checkpoint",
             "{}: the optimizer has made {} steps, the trainer state says {}", dir, optimizer.step_count(), state.step);
  return state;
}

nn::StateDict gather_trainable_state(FsdpUnit& root, nn::Module& model) {
  std::map<const TensorImpl*, Tensor> full;
  for (const auto& u : root.schedule_units()) {
    std::vector<Tensor> got = u->gather_trainable();
    size_t k = 0;
    for (const FsdpTensor& t : u->tensors())
      if (t.trainable) full[t.tensor.impl().get()] = got[k++];
  }
  nn::StateDict out;
  for (const auto& [name, p] : model.named_trainable_parameters()) {
    auto it = full.find(p.impl().get());
    out[name] = it != full.end() ? it->second : p.detach().clone();
  }
  return out;
}

void save_adapter_sharded(FsdpUnit& root, nn::Module& model, const nn::LoraConfig& config, const std::string& dir) {
  const nn::StateDict full = gather_trainable_state(root, model);
  if (root.group().rank() == 0) {
    // Point the trained parameters at their full tensors for nn::save_adapter, then back at their shards.
    std::vector<std::pair<Tensor, Tensor>> restore;  // (parameter, its own data)
    for (const auto& [name, p] : model.named_trainable_parameters()) {
      restore.emplace_back(p, p.detach());
      nn::point_at(p, full.at(name));
    }
    try {
      nn::save_adapter(model, config, dir);
    } catch (...) {
      for (auto& [p, own] : restore) nn::point_at(p, own);
      throw;
    }
    for (auto& [p, own] : restore) nn::point_at(p, own);
  }
  root.group().barrier().wait();
}

}  // namespace kiln::dist

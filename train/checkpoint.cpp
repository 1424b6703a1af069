// Atomic training checkpoints and their validated reload (moved here from the kiln command line so
// every Trainer user gets them).
#include "train/checkpoint.h"

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/file_io.h"
#include "core/json_int.h"
#include "io/safetensors.h"

namespace kiln::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kStateFormat = "kiln-trainer-state-1";
constexpr const char* kTrainableFile = "trainable.safetensors";

CheckpointWriteHook& write_hook() {
  static CheckpointWriteHook hook;
  return hook;
}

void before_write(const fs::path& path) {
  if (write_hook()) write_hook()(path.string());
}

// Once latest names a new complete checkpoint, the checkpoint-*.tmp and checkpoint-*.old folders of
// saves that were killed are garbage: removed, best effort (a failure here loses nothing).
void remove_interrupted_saves(const fs::path& output) {
  std::error_code ec;
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(output, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    const bool ours = n.rfind("checkpoint-", 0) == 0 && n.size() > 4 &&
                      (n.compare(n.size() - 4, 4, ".tmp") == 0 || n.compare(n.size() - 4, 4, ".old") == 0);
    if (ours && it->is_directory(ec)) stale.push_back(it->path());
  }
  for (const fs::path& p : stale) fs::remove_all(p, ec);
}

json points_json(const std::vector<LossPoint>& pts) {
  json a = json::array();
  for (const LossPoint& p : pts) a.push_back({p.step, p.loss});
  return a;
}

std::vector<LossPoint> points_from(const json& a, const std::string& source) {
  std::vector<LossPoint> out;
  const std::string what = source + ": a loss point's step";
  for (const json& p : a) out.push_back({need_json_int(p.at(0), "checkpoint", what), p.at(1).get<double>()});
  return out;
}

// Lists the `key=value;` entries that differ between two fingerprints.
std::string fingerprint_diff(const std::string& saved, const std::string& now) {
  auto parse = [](const std::string& s) {
    std::map<std::string, std::string> m;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ';')) {
      const size_t eq = item.find('=');
      if (eq != std::string::npos) m[item.substr(0, eq)] = item.substr(eq + 1);
    }
    return m;
  };
  const auto a = parse(saved), b = parse(now);
  std::string out;
  for (const auto& [k, v] : b) {
    auto it = a.find(k);
    const std::string was = it == a.end() ? "(absent)" : it->second;
    if (was != v) out += fmt::format("{}{}: checkpoint '{}', now '{}'", out.empty() ? "" : "; ", k, was, v);
  }
  for (const auto& [k, v] : a)
    if (!b.count(k)) out += fmt::format("{}{}: checkpoint '{}', now (absent)", out.empty() ? "" : "; ", k, v);
  return out.empty() ? "settings differ" : out;
}

// The trainable parameters of `model` from <dir>/trainable.safetensors: exactly the same names,
// shapes checked by load_state_dict before anything is copied.
void load_trainable(nn::Module& model, const fs::path& file) {
  KILN_CHECK(fs::exists(file), "checkpoint", "expected the trained weights in {}, found no such file", file.string());
  const io::SafetensorsFile f = io::SafetensorsFile::open(file.string());
  std::set<std::string> want;
  for (const auto& [name, p] : model.named_trainable_parameters()) want.insert(name);
  nn::StateDict state;
  for (const std::string& k : f.keys()) {
    KILN_CHECK(want.count(k), "checkpoint", "{}: expected only the model's trainable parameters, found '{}'", file.string(), k);
    state[k] = f.get(k);
  }
  for (const std::string& k : want)
    KILN_CHECK(state.count(k), "checkpoint", "{}: expected trainable parameter '{}', found none", file.string(), k);
  model.load_state_dict(state, /*strict=*/false);
}

}  // namespace

std::string TrainerState::to_json() const {
  json j{{"format", kStateFormat},
         {"step", step},
         {"tokens", tokens},
         {"skipped_steps", skipped_steps},
         {"data_position", json::parse(data.to_json())},
         {"rng", {{"seed", rng.seed}, {"offset", rng.offset}}},
         {"fingerprint", fingerprint},
         {"train_losses", points_json(train_losses)},
         {"eval_losses", points_json(eval_losses)}};
  return j.dump(1);
}

TrainerState TrainerState::from_json(const std::string& text, const std::string& source) {
  TrainerState s;
  try {
    const json j = json::parse(text);
    KILN_CHECK(j.value("format", "") == kStateFormat, "checkpoint", "{}: expected format '{}', found '{}'", source,
               kStateFormat, j.value("format", ""));
    s.step = need_json_int(j.at("step"), "checkpoint", source + ": step");
    s.tokens = need_json_int(j.at("tokens"), "checkpoint", source + ": tokens");
    if (j.contains("skipped_steps"))  // absent in older builds' files
      s.skipped_steps = need_json_int(j["skipped_steps"], "checkpoint", source + ": skipped_steps");
    s.data = data::DataPosition::from_json(j.at("data_position").dump());
    s.rng.seed = need_json_uint(j.at("rng").at("seed"), "checkpoint", source + ": rng.seed");
    s.rng.offset = need_json_uint(j.at("rng").at("offset"), "checkpoint", source + ": rng.offset");
    s.fingerprint = j.at("fingerprint").get<std::string>();
    s.train_losses = points_from(j.at("train_losses"), source);
    s.eval_losses = points_from(j.at("eval_losses"), source);
  } catch (const json::exception& e) {
    KILN_FAIL("checkpoint", "{}: corrupt trainer state: {}", source, e.what());
  }
  KILN_CHECK(s.step >= 0 && s.tokens >= 0 && s.skipped_steps >= 0, "checkpoint",
             "{}: expected a non-negative step, token count and skipped-step count, found {}, {} and {}", source, s.step,
             s.tokens, s.skipped_steps);
  return s;
}

void set_checkpoint_write_hook(CheckpointWriteHook hook) { write_hook() = std::move(hook); }

std::string checkpoint_name(int64_t step) { return fmt::format("checkpoint-{}", step); }

void set_latest_checkpoint(const std::string& output, const std::string& name) {
  write_file_atomic((fs::path(output) / "latest").string(), name + "\n", "checkpoint");
}

TrainerState read_trainer_state(const std::string& dir, const std::string& fingerprint) {
  const fs::path state_path = fs::path(dir) / "trainer_state.json";
  TrainerState s = TrainerState::from_json(read_file(state_path.string(), "checkpoint"), state_path.string());
  KILN_CHECK(s.fingerprint == fingerprint, "checkpoint", "{} was written by a run with other settings: {}", dir,
             fingerprint_diff(s.fingerprint, fingerprint));
  return s;
}

std::string save_checkpoint(const std::string& output, nn::Module& model, const nn::LoraConfig* lora,
                            const nn::Optimizer& optimizer, const TrainerState& state) {
  const std::string name = checkpoint_name(state.step);
  const fs::path out(output), final_dir = out / name, tmp = out / (name + ".tmp"), old = out / (name + ".old");
  try {
    fs::remove_all(tmp);  // a partial folder of an earlier, interrupted save
    fs::create_directories(tmp);
    const fs::path weights = lora ? tmp / "adapter" : tmp / kTrainableFile;
    before_write(weights);
    if (lora) nn::save_adapter(model, *lora, weights.string());
    else io::save_safetensors(weights.string(), model.named_trainable_parameters());
    before_write(tmp / "optimizer.safetensors");
    optimizer.save((tmp / "optimizer.safetensors").string());
    before_write(tmp / "trainer_state.json");
    write_file_atomic((tmp / "trainer_state.json").string(), state.to_json(), "checkpoint");
    if (fs::exists(final_dir)) {  // this step was saved before: keep it (as .old) until the new one is in place
      fs::remove_all(old);
      before_write(old);
      fs::rename(final_dir, old);
    }
    before_write(final_dir);
    fs::rename(tmp, final_dir);
    before_write(out / "latest");
    set_latest_checkpoint(output, name);
    fs::remove_all(old);
    remove_interrupted_saves(out);
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    if (!fs::exists(final_dir, ec) && fs::is_directory(old, ec)) fs::rename(old, final_dir, ec);  // put it back
    std::string previous = "no earlier checkpoint exists";
    try {
      if (const auto dir = latest_checkpoint(output)) previous = fmt::format("the previous checkpoint {} is intact", *dir);
    } catch (const std::exception&) {
      previous = "no earlier checkpoint is readable";
    }
    KILN_FAIL("checkpoint", "writing {} failed: {}; {}", final_dir.string(), e.what(), previous);
  }
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& output) {
  const fs::path p = fs::path(output) / "latest";
  if (!fs::exists(p)) return std::nullopt;
  std::string name = read_file(p.string(), "checkpoint");
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
  // One folder name of at most 255 bytes (NAME_MAX), so a corrupt file is an error here, not the OS's.
  KILN_CHECK(!name.empty() && name.size() <= 255 && name.find_first_of(std::string("/\0", 2)) == std::string::npos &&
                 name != "." && name != "..",
             "checkpoint", "{}: expected a checkpoint folder name, found '{}' (corrupt)", p.string(),
             name.size() <= 80 ? name : name.substr(0, 80) + "...");
  const fs::path dir = fs::path(output) / name, old = fs::path(output) / (name + ".old");
  std::error_code ec_dir, ec_old;
  const bool have_dir = fs::is_directory(dir, ec_dir), have_old = fs::is_directory(old, ec_old);
  if (!have_dir && have_old) return old.string();  // killed while re-saving this step
  KILN_CHECK(have_dir, "checkpoint", "{} names {}, which {}", p.string(), dir.string(),
             ec_dir && ec_dir != std::errc::no_such_file_or_directory ? "cannot be read: " + ec_dir.message()
                                                                      : std::string("does not exist"));
  return dir.string();
}

TrainerState load_checkpoint(const std::string& dir, nn::Module& model, nn::Optimizer& optimizer,
                             const std::string& fingerprint) {
  const fs::path d(dir);
  TrainerState s = read_trainer_state(dir, fingerprint);
  KILN_CHECK(!fs::exists(d / "sharded.json"), "checkpoint",
             "{} was written by a sharded run (fully_shard; kiln finetune --shard): resume it sharded", dir);
  KILN_CHECK(fs::exists(d / "optimizer.safetensors"), "checkpoint", "{}: expected optimizer.safetensors, found none", dir);
  if (fs::is_directory(d / "adapter")) nn::load_adapter(model, (d / "adapter").string());
  else load_trainable(model, d / kTrainableFile);
  optimizer.load((d / "optimizer.safetensors").string());
  KILN_CHECK(optimizer.step_count() == s.step, "checkpoint", "{}: the optimizer has made {} steps, the trainer state says {}",
             dir, optimizer.step_count(), s.step);
  return s;
}

}  // namespace kiln::train

// The streaming sharded safetensors writer and the byte-size parser of --max-shard-size.
#include "io/shard_writer.h"

#include <cctype>
#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/ops.h"
#include "io/safetensors.h"

namespace kiln::io {

namespace fs = std::filesystem;

ShardedSafetensorsWriter::ShardedSafetensorsWriter(std::string dir, size_t max_shard_bytes,
                                                   std::map<std::string, std::string> metadata)
    : dir_(std::move(dir)), max_shard_bytes_(max_shard_bytes), metadata_(std::move(metadata)) {
  KILN_CHECK(fs::is_directory(dir_), "safetensors", "{}: the output folder does not exist", dir_);
  KILN_CHECK(max_shard_bytes_ > 0, "safetensors", "the shard size must be positive");
}

void ShardedSafetensorsWriter::add(const std::string& name, const Tensor& t) {
  KILN_CHECK(!finished_, "safetensors", "{}: add('{}') after finish()", dir_, name);
  KILN_CHECK(!name.empty() && t.defined(), "safetensors", "{}: tensor '{}' is undefined or unnamed", dir_, name);
  KILN_CHECK(seen_.emplace(name, 0).second, "safetensors", "{}: tensor '{}' added twice", dir_, name);
  const size_t nb = t.nbytes();
  if (pending_bytes_ > 0 && pending_bytes_ + nb > max_shard_bytes_) flush();
  pending_.emplace_back(name, contiguous(to_device(t, kCPU)));
  pending_bytes_ += nb;
  total_bytes_ += nb;
}

void ShardedSafetensorsWriter::flush() {
  if (pending_.empty()) return;
  const std::string tmp = fmt::format("shard-{:05d}.safetensors.partial", written_.size() + 1);
  save_safetensors((fs::path(dir_) / tmp).string(), pending_, metadata_);
  std::vector<std::string> keys;
  for (const auto& [k, t] : pending_) keys.push_back(k);
  shard_keys_.push_back(std::move(keys));
  written_.push_back(tmp);
  pending_.clear();
  pending_bytes_ = 0;
}

std::vector<std::string> ShardedSafetensorsWriter::finish() {
  KILN_CHECK(!finished_, "safetensors", "{}: finish() called twice", dir_);
  flush();
  finished_ = true;
  KILN_CHECK(!written_.empty(), "safetensors", "{}: no tensors to write", dir_);
  const size_t n = written_.size();
  std::vector<std::string> names;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < n; ++i) {
    names.push_back(n == 1 ? "model.safetensors" : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, n));
    fs::rename(fs::path(dir_) / written_[i], fs::path(dir_) / names.back());
    for (const std::string& k : shard_keys_[i]) weight_map[k] = names.back();
  }
  if (n > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", weight_map}};
    write_file_atomic((fs::path(dir_) / "model.safetensors.index.json").string(), index.dump(2) + "\n", "safetensors");
  }
  return names;
}

size_t parse_byte_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  KILN_CHECK(i > 0, "export", "size '{}' should be a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)", text);
  std::string unit = text.substr(i);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, size_t> units = {{"", 1},           {"B", 1},           {"KB", 1000},
                                                      {"MB", 1000000},   {"GB", 1000000000}, {"KIB", size_t{1} << 10},
                                                      {"MIB", size_t{1} << 20}, {"GIB", size_t{1} << 30}};
  const auto it = units.find(unit);
  KILN_CHECK(it != units.end(), "export", "size '{}': unknown unit '{}' (B, KB, MB, GB, KiB, MiB, GiB)", text,
             text.substr(i));
  const size_t value = std::stoull(text.substr(0, i));
  KILN_CHECK(value > 0, "export", "size '{}' must be positive", text);
  return value * it->second;
}

}  // namespace kiln::io

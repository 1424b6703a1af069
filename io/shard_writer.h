// Writing a Hugging Face checkpoint one tensor at a time: tensors are gathered into shards of at most
// a given size and each full shard is written at once, so only one shard is ever held in memory.
// One shard is saved as model.safetensors (what transformers' save_pretrained does); several as
// model-0000i-of-0000n.safetensors with model.safetensors.index.json.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace kiln::io {

class ShardedSafetensorsWriter {
 public:
  // `dir` must exist. A tensor larger than `max_shard_bytes` gets a shard of its own. `metadata` goes
  // into every shard's header (transformers wants {"format": "pt"}).
  ShardedSafetensorsWriter(std::string dir, size_t max_shard_bytes, std::map<std::string, std::string> metadata = {});
  // Copies `t` to contiguous host bytes (its dtype kept). Names must be unique.
  void add(const std::string& name, const Tensor& t);
  // Writes the last shard, names the shards and writes the index (when there are several); returns the
  // shard file names in order. Shards are written under temporary names until then.
  std::vector<std::string> finish();

 private:
  void flush();
  std::string dir_;
  size_t max_shard_bytes_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::pair<std::string, Tensor>> pending_;  // the shard being filled (host tensors)
  size_t pending_bytes_ = 0;
  std::vector<std::vector<std::string>> shard_keys_;  // the keys of each written shard
  std::vector<std::string> written_;                  // their temporary file names
  size_t total_bytes_ = 0;
  std::map<std::string, int> seen_;
  bool finished_ = false;
};

// "5GB", "500MB", "10KB", "123" (bytes); decimal units as transformers' max_shard_size reads them
// (KiB/MiB/GiB are binary). kiln::Error "[export] ..." on anything else.
size_t parse_byte_size(const std::string& text);

}  // namespace kiln::io

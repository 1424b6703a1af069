// Reading and writing safetensors files (Hugging Face's format: 8-byte little-endian header length,
// a JSON header, then the raw tensor bytes), single files and sharded checkpoints with an index.
// Tensors read from a file are zero-copy CPU views of a private memory mapping of it.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace kiln::io {

// One header entry; begin/end are byte offsets into the data section (after the header).
struct TensorInfo {
  DType dtype = DType::f32;
  Shape shape;
  size_t begin = 0;
  size_t end = 0;
};

// A parsed .safetensors file. Copies share the mapping; tensors from get() keep it alive on their
// own, so they stay valid after every SafetensorsFile is gone. The mapping is copy-on-write
// (MAP_PRIVATE): writing into a returned tensor never changes the file.
class SafetensorsFile {
 public:
  // Maps and validates `path`; throws kiln::Error naming the file and the key or offset at fault.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> keys() const;  // sorted by name
  bool contains(const std::string& key) const { return infos_.count(key) != 0; }
  const TensorInfo& info(const std::string& key) const;
  // A CPU tensor viewing the mapping (copied only where the bytes are misaligned for the dtype).
  Tensor get(const std::string& key) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> map_;
  size_t data_start_ = 0;  // 8 + header length
  std::map<std::string, TensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (any layout or device; copied to contiguous CPU bytes) in the given order,
// with the header padded with spaces to a multiple of 8 bytes. Atomic: a temporary file in the
// same folder is written, fsync'ed and renamed over `path`. Names must be unique and non-empty.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A sharded checkpoint: `dir/model.safetensors.index.json` maps each key ("weight_map") to a
// shard file in `dir`. Each shard is opened once; get() looks keys up lazily.
class ShardedCheckpoint {
 public:
  static ShardedCheckpoint open(const std::string& dir);

  std::vector<std::string> keys() const;  // sorted by name
  bool contains(const std::string& key) const { return weight_map_.count(key) != 0; }
  const std::string& shard_of(const std::string& key) const;  // the shard's file name
  Tensor get(const std::string& key) const;
  std::map<std::string, Tensor> load_all() const;

 private:
  std::string dir_;
  std::map<std::string, std::string> weight_map_;
  std::map<std::string, SafetensorsFile> shards_;
};

// Every tensor of the sharded checkpoint in `dir`, by key.
std::map<std::string, Tensor> load_sharded(const std::string& dir);

// Writes `tensors` to `dir` (which must exist) as model-0000i-of-0000n.safetensors shards of at
// most `max_shard_bytes` of tensor data each (a larger tensor gets a shard of its own), plus
// model.safetensors.index.json with "metadata": {"total_size": ...} and "weight_map".
// `metadata` goes into every shard's header. Returns the shard file names in order.
std::vector<std::string> save_sharded(const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
                                      size_t max_shard_bytes, const std::map<std::string, std::string>& metadata = {});

}  // namespace kiln::io

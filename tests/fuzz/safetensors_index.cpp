// Fuzz target: model.safetensors.index.json through io::ShardedCheckpoint::open, in a folder that also
// holds two valid shards (model-00001-of-00002.safetensors with "a" and "b", model-00002-of-00002 with
// "c"), then every tensor the index names read back.
#include <cstddef>
#include <cstdint>

#include "core/ops.h"
#include "io/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// The folder with the two shards, made once per process.
const std::string& checkpoint_dir() {
  static const std::string dir = [] {
    const std::filesystem::path d = kiln::fuzz::scratch("sharded");
    std::filesystem::create_directories(d);
    kiln::io::save_safetensors((d / "model-00001-of-00002.safetensors").string(),
                               {{"a", kiln::full({2, 3}, 1.0f)}, {"b", kiln::full({4}, 2.0f)}});
    kiln::io::save_safetensors((d / "model-00002-of-00002.safetensors").string(), {{"c", kiln::full({1}, 3.0f)}});
    return d.string();
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = checkpoint_dir();
  kiln::fuzz::write_file(std::filesystem::path(dir) / "model.safetensors.index.json", data, size);
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::io::ShardedCheckpoint ck = kiln::io::ShardedCheckpoint::open(dir);
    for (const std::string& key : ck.keys()) {
      (void)ck.shard_of(key);
      (void)ck.get(key);
    }
  });
  return 0;
}

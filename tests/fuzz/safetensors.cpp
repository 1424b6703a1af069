// Fuzz target: a .safetensors file (8-byte header length, JSON header, tensor bytes) through
// io::SafetensorsFile::open, then every tensor read back (its first and last byte touched).
#include <cstddef>
#include <cstdint>

#include "io/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kiln::fuzz::write_file(kiln::fuzz::scratch("input.safetensors"), data, size);
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::io::SafetensorsFile f = kiln::io::SafetensorsFile::open(path);
    volatile uint8_t sink = 0;
    for (const std::string& key : f.keys()) {
      const kiln::Tensor t = f.get(key);
      const auto* bytes = static_cast<const uint8_t*>(t.raw_data());
      if (t.nbytes() > 0) sink = sink ^ bytes[0] ^ bytes[t.nbytes() - 1];
    }
    for (const auto& [k, v] : f.metadata()) sink = sink ^ static_cast<uint8_t>(k.size() + v.size());
  });
  return 0;
}

// Fuzz target: a bnb-4bit weight as transformers stores it (quant/bnb_checkpoint.h) through
// quant::read_bnb_nf4, the quant_state JSON bytes coming from the input together with the sizes and
// dtypes of the tensors around it; a weight that reads is dequantised (every value touched).
// Input: byte 0 flags (1: absmax f32 instead of u8, 2: no nested tensors, 4: 1-d packed, 8: a wrong quant_map
// entry), bytes 1-6 the packed, absmax and nested_absmax element counts (u16 little-endian), then the JSON.
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "quant/bnb_checkpoint.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

size_t u16_at(const uint8_t* p) { return static_cast<size_t>(p[0]) | (static_cast<size_t>(p[1]) << 8); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kiln::from_vector;
  if (size < 7) return 0;
  const uint8_t flags = data[0];
  const size_t n_packed = u16_at(data + 1), n_absmax = u16_at(data + 3), n_nested = u16_at(data + 5);
  const std::vector<uint8_t> state(data + 7, data + size);
  const std::string w = "model.layers.0.mlp.down_proj.weight";

  std::vector<uint8_t> packed(n_packed), absmax_u8(n_absmax);
  for (size_t i = 0; i < n_packed; ++i) packed[i] = static_cast<uint8_t>(i * 37 + 11);
  for (size_t i = 0; i < n_absmax; ++i) absmax_u8[i] = static_cast<uint8_t>(i * 13);
  std::vector<float> levels(kiln::quant::nf4_levels().begin(), kiln::quant::nf4_levels().end());
  if (flags & 8) levels[5] += 0.25f;
  std::vector<float> code(kiln::quant::dynamic_code().begin(), kiln::quant::dynamic_code().end());

  std::vector<std::pair<std::string, kiln::Tensor>> tensors;
  tensors.emplace_back(w + ".quant_state.bitsandbytes__nf4",
                       from_vector(state, {static_cast<int64_t>(state.size())}));
  tensors.emplace_back(w, from_vector(packed, (flags & 4) ? kiln::Shape{static_cast<int64_t>(n_packed)}
                                                           : kiln::Shape{static_cast<int64_t>(n_packed), 1}));
  if (flags & 1) tensors.emplace_back(w + ".absmax", from_vector(std::vector<float>(n_absmax, 0.5f), {static_cast<int64_t>(n_absmax)}));
  else tensors.emplace_back(w + ".absmax", from_vector(absmax_u8, {static_cast<int64_t>(n_absmax)}));
  tensors.emplace_back(w + ".quant_map", from_vector(levels, {16}));
  if (!(flags & 2)) {
    tensors.emplace_back(w + ".nested_absmax", from_vector(std::vector<float>(n_nested, 0.01f), {static_cast<int64_t>(n_nested)}));
    tensors.emplace_back(w + ".nested_quant_map", from_vector(code, {256}));
  }
  kiln::fuzz::expect_kiln_errors_only([&] {
    const kiln::quant::NF4Weight q = kiln::quant::read_bnb_nf4(tensors, w);
    const kiln::Tensor values = kiln::quant::dequantize_nf4(q, kiln::DType::f32);
    const std::vector<float> v = values.to_vector<float>();
    volatile float sink = std::accumulate(v.begin(), v.end(), 0.0f);
    (void)sink;
  });
  return 0;
}

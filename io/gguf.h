// Writing GGUF v3 files (ggml's single-file format that llama.cpp loads): typed metadata key/values,
// then tensor infos, then the tensor data aligned to `general.alignment` (32). Tensors are stored
// as f32, f16, bf16 or Q8_0 (blocks of 32 int8 values with one f16 scale), converted from any dtype.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "core/tensor.h"

namespace kiln::io {

// ggml_type values of the tensor types written here.
enum class GGUFTensorType : uint32_t { f32 = 0, f16 = 1, q8_0 = 8, bf16 = 30 };
const char* gguf_type_name(GGUFTensorType t);
// "f32", "f16", "bf16", "q8_0"; kiln::Error "[gguf] ..." otherwise.
GGUFTensorType parse_gguf_type(const std::string& name);

// One metadata value (the GGUF value type follows the C++ type: UINT32, INT32, UINT64, FLOAT32, BOOL,
// STRING, or an ARRAY of STRING, INT32 or FLOAT32).
using GGUFValue = std::variant<uint32_t, int32_t, uint64_t, float, bool, std::string, std::vector<std::string>,
                               std::vector<int32_t>, std::vector<float>>;
using GGUFMetadata = std::vector<std::pair<std::string, GGUFValue>>;

// A tensor to write: its GGUF name, its shape as kiln/PyTorch order it (rows first; the file stores
// ggml's reversed order), and its stored type.
struct GGUFTensorInfo {
  std::string name;
  Shape shape;
  GGUFTensorType type = GGUFTensorType::f32;
};

// Bytes a tensor of `shape` takes as `type`. Q8_0 needs the last dim to be a multiple of 32.
size_t gguf_tensor_bytes(const Shape& shape, GGUFTensorType type);
// Q8_0 as ggml's quantize_row_q8_0_ref (and gguf-py) computes it: per block of 32, d = max|x| / 127,
// q = round-half-away(x * (1/d)) (0 where d = 0), stored as f16 d then 32 int8. `n` is a multiple of 32;
// `out` holds n / 32 * 34 bytes.
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);

// Writes a GGUF v3 file: the metadata (general.alignment is added as 32 unless given), the tensor
// infos, then each tensor's data in order; `tensor_data(i)` is asked for tensor i only when it is
// written (any dtype and device; it must have infos[i].shape), so a large model never needs all its
// converted tensors at once. Atomic: a temporary file next to `path`, renamed at the end (nothing is
// left behind on an error). Names must be unique, non-empty and at most 64 bytes (ggml's limit).
void write_gguf(const std::string& path, const GGUFMetadata& metadata, const std::vector<GGUFTensorInfo>& infos,
                const std::function<Tensor(size_t i)>& tensor_data);

}  // namespace kiln::io

// bitsandbytes-4bit checkpoints as transformers writes them (save_pretrained of a model loaded with
// BitsAndBytesConfig(load_in_4bit=True)): reading an NF4Weight from the tensors of one Linear4bit
// and producing the same tensors back, so kiln loads hub checkpoints bit for bit and saves its own.
//
// For a weight key W (e.g. "model.layers.0.self_attn.q_proj.weight") the file holds
//   W                                   u8 (ceil(numel/2), 1)   packed codes, high nibble first
//   W.absmax                            u8 (nblocks) with double quantisation, else f32 (nblocks)
//   W.quant_map                         f32 (16)                the NF4 levels
//   W.nested_absmax                     f32 (ceil(nblocks/256))          (double quantisation only)
//   W.nested_quant_map                  f32 (256)                        (double quantisation only)
//   W.quant_state.bitsandbytes__nf4     u8 (bytes)  JSON: {"quant_type": "nf4", "blocksize": 64,
//        "dtype": "bfloat16", "shape": [N, K], "nested_blocksize": 256, "nested_dtype": "float32",
//        "nested_offset": <offset>}   (the nested_* entries only with double quantisation)
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"
#include "quant/nf4.h"

namespace kiln::quant {

// True when `weight_key` is stored as a bnb NF4 weight (its quant_state entry is present).
bool is_bnb_nf4(const io::SafetensorsFile& file, const std::string& weight_key);
// Reads and validates the NF4 weight stored under `weight_key` (CPU tensors viewing the file; use
// to_device to move it). Every inconsistency throws kiln::Error "[bnb_nf4] <key>: ...".
NF4Weight read_bnb_nf4(const io::SafetensorsFile& file, const std::string& weight_key);
// The same from loose tensors by full key (e.g. gathered from a sharded checkpoint).
NF4Weight read_bnb_nf4(const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& weight_key);

// The JSON bytes of W.quant_state.bitsandbytes__nf4 (Python json.dumps formatting, as bnb writes it).
std::string bnb_quant_state_json(const NF4Weight& w);
// The (key, tensor) entries for `weight_key`, in bnb's order, ready for io::save_safetensors.
std::vector<std::pair<std::string, Tensor>> bnb_nf4_tensors(const std::string& weight_key, const NF4Weight& w);

}  // namespace kiln::quant

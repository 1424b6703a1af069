// A Llama as llama.cpp loads it from GGUF: the metadata keys, tensor names and q/k row order that
// llama.cpp's convert_hf_to_gguf.py writes for LlamaForCausalLM, the "gpt2" (byte-level BPE)
// tokenizer vocabulary read from a Hugging Face tokenizer.json, and the file itself (io/gguf.h),
// with LoRA adapters merged and NF4 weights dequantised on the way (nn/merge.h); or the adapters alone
// as a llama.cpp LoRA file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "nn/llama.h"

namespace kiln::nn {

// The tokenizer keys (tokenizer.ggml.*): tokens by id (ids the tokenizer lacks up to the model's
// vocabulary are "[PAD<id>]", UNUSED), their types (1 normal, 3 control = special added token,
// 4 user-defined = other added token, 5 unused), merges as "left right", and special ids.
struct GGUFVocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> token_types;
  std::vector<std::string> merges;
  int64_t bos_id = -1;  // -1: not written
  int64_t eos_id = -1;
  int64_t pad_id = -1;
  bool add_bos = true;
  std::string pre = "llama-bpe";  // llama.cpp's pre-tokenizer name (Llama 3's split regex)
  std::string chat_template;      // tokenizer_config.json's, when present
};

// Reads `dir`/tokenizer.json (and tokenizer_config.json when present: bos/eos/pad tokens,
// add_bos_token, chat_template) for a model of `vocab_size` ids. Token ids past vocab_size, a
// tokenizer that is not byte-level BPE, or a missing file are errors "[gguf] ...".
GGUFVocab read_gguf_vocab(const std::string& dir, int64_t vocab_size);

// The llama.cpp name of a Hugging Face Llama tensor ("model.layers.3.self_attn.q_proj.weight" ->
// "blk.3.attn_q.weight", "model.embed_tokens.weight" -> "token_embd.weight", "lm_head.weight" ->
// "output.weight"); an error for a key that is not part of a Llama.
std::string gguf_tensor_name(const std::string& hf_key);
// convert_hf_to_gguf's LlamaModel.permute of q_proj/k_proj rows (weight (heads*D, in) or bias
// (heads*D)): within each head, rows (half i of pair j) move from j*D/2 + i to 2*i + j, from the
// rotate-half layout of HF to llama.cpp's interleaved RoPE pairs.
Tensor gguf_permute_qk(const Tensor& w, int64_t heads);
// Llama 3.1's `llama3` rope scaling as llama.cpp reads it: the factor of each of the head_dim/2
// frequencies (f32), the tensor "rope_freqs.weight".
Tensor llama3_rope_factors(const LlamaConfig& c);

// general.*, llama.* and tokenizer.ggml.* metadata as convert_hf_to_gguf writes them.
io::GGUFMetadata llama_gguf_metadata(const LlamaConfig& c, const GGUFVocab& vocab, io::GGUFTensorType type,
                                     const std::string& name);

// Writes `model` (any mix of Linear, NF4Linear and LoraLinear layers: adapters merged in f32, NF4
// dequantised) to one GGUF file. Matrices are stored as `type` (Q8_0 falls back to f16 for a matrix
// whose rows are not a multiple of 32, as convert_hf_to_gguf does); 1-d tensors stay f32. An untied
// lm_head becomes output.weight; a tied one is left out (llama.cpp reuses token_embd).
void write_llama_gguf(const std::string& path, Llama& model, const GGUFVocab& vocab, io::GGUFTensorType type,
                      const std::string& name = "kiln export");

// Writes the LoRA adapters of `model` (LoraLinear layers, not merged) as a llama.cpp LoRA file
// (general.type "adapter", adapter.type "lora", adapter.lora.alpha = scaling * rank, one for all layers):
// "<base tensor>.lora_a" (r, in) and ".lora_b" (out, r), B's rows of q and k permuted as their weights
// are. llama.cpp adds it to a base GGUF written by write_llama_gguf from the same (unmerged) base.
// Matrices as `type` (Q8_0 rows that are not a multiple of 32 as f16).
void write_llama_lora_gguf(const std::string& path, Llama& model, io::GGUFTensorType type,
                           const std::string& name = "kiln LoRA");

}  // namespace kiln::nn

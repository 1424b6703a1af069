// NF4 4-bit weights exactly as bitsandbytes stores them (so bnb-4bit checkpoints load bit for bit):
// the NF4Weight format, quantise / dequantise on CPU and CUDA, the 8-bit blockwise primitives of
// double quantisation, and the NF4 linear op (input gradient only; the base weight is frozen).
//
// Format (bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=double_quant)):
//   * the weight, flattened row-major (n = numel), is cut into blocks of `blocksize` (64) values;
//     each block's absmax = max |w| (f32); a value's code is the NF4 level nearest to w / absmax
//     (bnb's decision tree: code = number of level midpoints m with w * (1/absmax) > m);
//   * packed: u8 (ceil(n/2)), two codes per byte, the even element in the HIGH nibble; an odd n
//     pads the last low nibble with the code of 0 (7), an all-zero block gets code 0 and absmax 0;
//   * double quantisation: offset = mean(absmax) (f32), then absmax - offset is quantised 8-bit
//     blockwise (blocks of `nested_blocksize` = 256) against bnb's signed dynamic code
//     (create_dynamic_map(signed=True), 256 entries): absmax becomes u8 codes, nested_absmax holds
//     one f32 scale per 256-block. Dequantised scale of block b:
//       s_b = fl(fl(nested_code[absmax[b]] * nested_absmax[b / 256]) + offset)   (no FMA)
//     and a weight is fl(nf4_level[code] * s_b) rounded to the output dtype, as bnb computes it.
// Bit exactness: dequantisation matches bnb on every device. CUDA quantisation reproduces bnb's
// CUDA kernel (built with --use_fast_math: approximate reciprocal, flush-to-zero), so it gives the
// bytes of checkpoints made on a GPU. The CPU quantiser uses the IEEE reciprocal (as bnb's CPU path
// does); the two differ by one ulp of w/absmax at most, which changes a code only when that value
// sits within an ulp of a midpoint (none among the ~200k weights of tests/data/nf4). offset is the
// correctly rounded mean (summed in f64); it equalled torch's f32 mean on every fixture, but the two
// can differ in the last bit, which moves only 8-bit scale codes (double_quantize_absmax takes an
// explicit offset to reproduce a given file).
// Typical use: q = quantize_nf4(w) at load (or read_bnb_nf4 from a bnb-4bit checkpoint, then
// to_device), y = nf4_linear(x, q, bias) in forward; save with bnb_nf4_tensors (bnb_checkpoint.h).
#pragma once
#include <array>
#include <cstdint>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::quant {

inline constexpr int64_t kNF4BlockSize = 64;      // bnb's default (and Hugging Face's) block size
inline constexpr int64_t kNestedBlockSize = 256;  // bnb quantises the absmax in blocks of 256

// The 16 NF4 levels (bnb's table, ascending, -1 ... 1) and the 15 midpoints the quantiser compares with.
const std::array<float, 16>& nf4_levels();
const std::array<float, 15>& nf4_midpoints();
// bnb's signed 8-bit dynamic code, create_dynamic_map(signed=True), ascending (code[127] = 0, code[255] = 1).
const std::array<float, 256>& dynamic_code();
Tensor nf4_levels_tensor(Device device = kCPU);    // f32 (16): bnb's "quant_map"
Tensor dynamic_code_tensor(Device device = kCPU);  // f32 (256): bnb's "nested_quant_map"

// The NF4 code of a normalised value x = w * (1/absmax) (bnb's tree; NaN -> 0).
uint8_t nf4_code(float x);
// The 8-bit code of a normalised value against a sorted 256-entry code: bnb's CUDA search (seven
// halving steps from entry 127, then the nearer neighbour by midpoint, ties to the lower entry).
uint8_t dynamic_code_index(const float* code, float x);

struct NF4Weight {
  Tensor packed;         // u8 (ceil(n/2)): two codes per byte, high nibble first
  Tensor absmax;         // double_quant: u8 (nblocks) codes into nested_code; else f32 (nblocks)
  Tensor nested_absmax;  // f32 (ceil(nblocks / nested_blocksize)); undefined unless double_quant
  Tensor nested_code;    // f32 (256); undefined unless double_quant
  float offset = 0.0f;   // mean of the f32 absmax, added back after the 8-bit decode
  Shape shape;           // the original weight's shape, e.g. (N, K) for a linear layer
  DType dtype = DType::bf16;  // the original weight's dtype (what bnb records as "dtype")
  int64_t blocksize = kNF4BlockSize;
  int64_t nested_blocksize = kNestedBlockSize;
  bool double_quant = true;

  int64_t numel() const { return kiln::numel(shape); }
  int64_t num_blocks() const { return (numel() + blocksize - 1) / blocksize; }
  Device device() const { return packed.device(); }
  size_t nbytes() const;  // bytes held by the tensors (packed + scales + code)
  // Checks dtypes, sizes, devices and block sizes; throws kiln::Error "[op] ...".
  void validate(const char* op) const;
};

// Quantises `w` (f32/bf16/f16; f64 is rounded to f32 first; any shape/layout, CPU or CUDA) on its own device.
// `blocksize` is a power of two in [64, 4096]. Synchronises once with the device when double_quant (the offset).
NF4Weight quantize_nf4(const Tensor& w, bool double_quant = true, int64_t blocksize = kNF4BlockSize);
// The weight as `out` (bf16/f16/f32) of shape q.shape on q's device; ONE kernel on CUDA (packed
// bytes + 8-bit absmax + nested absmax + offset in, values out, no intermediate buffer).
Tensor dequantize_nf4(const NF4Weight& q, DType out = DType::bf16);
// The f32 scale of every block (the decoded absmax; bnb's dequantize_blockwise(absmax) + offset).
Tensor dequantize_absmax(const NF4Weight& q);
// Moves every tensor of `q` to `device` (bytes unchanged).
NF4Weight to_device(const NF4Weight& q, Device device);

// The pieces of double quantisation, exposed for checkpoint io, tests and benchmarks.
struct NestedAbsmax {
  Tensor codes;          // u8 (nblocks)
  Tensor nested_absmax;  // f32 (ceil(nblocks / nested_blocksize))
};
// offset = mean(absmax) in f64, rounded to f32 (absmax: f32 (nblocks), any device).
float absmax_offset(const Tensor& absmax);
// Quantises absmax - offset 8-bit blockwise against `code` (f32 (256), default: dynamic_code_tensor).
NestedAbsmax double_quantize_absmax(const Tensor& absmax, float offset, int64_t nested_blocksize = kNestedBlockSize,
                                    const Tensor& code = Tensor());
// bnb's dequantize_blockwise: out[i] = code[codes[i]] * absmax[i / blocksize] (f32 (n)).
Tensor dequantize_blockwise_8bit(const Tensor& codes, const Tensor& absmax, const Tensor& code, int64_t blocksize);

// y = x @ dequantize_nf4(w)^T (+ bias): x (..., K) bf16/f16/f32, w of shape (N, K), bias (N) of x's
// dtype -> (..., N) in x's dtype (kiln::matmul, cuBLASLt on CUDA). Autograd gives the input (and bias)
// gradient only; nothing dequantised is kept between forward and backward (backward dequantises again).
// `dense`, when given, is w already dequantised ((N, K) in x's dtype, on its device, e.g. kept by
// nn::NF4Linear): forward and backward multiply by it instead of dequantising. `residual`, when given
// ((..., N) of x's dtype and device, contiguous), is added in the GEMM's epilogue (residual + the
// product, rounded once; with a bias, the bias is added after) and gets the output's gradient.
Tensor nf4_linear(const Tensor& x, const NF4Weight& w, const Tensor& bias = Tensor(), const Tensor& dense = Tensor(),
                  const Tensor& residual = Tensor());

}  // namespace kiln::quant

namespace kiln::prim {

// w (n values, contiguous f32/bf16/f16) -> packed u8 (ceil(n/2)), absmax f32 (ceil(n/blocksize)).
class NF4Quantize : public Primitive {
 public:
  explicit NF4Quantize(int64_t blocksize) : blocksize_(blocksize) {}
  const char* name() const override { return "nf4_quantize"; }
  std::vector<Attr> attrs() const override { return {{"blocksize", blocksize_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  int64_t blocksize() const { return blocksize_; }

 private:
  int64_t blocksize_;
};

// x f32 (n, contiguous), code f32 (256) -> codes u8 (n), absmax f32 (ceil(n/blocksize)): x - offset
// quantised blockwise (bnb's quantize_blockwise of `absmax - offset`).
class Blockwise8bitQuantize : public Primitive {
 public:
  Blockwise8bitQuantize(int64_t blocksize, float offset) : blocksize_(blocksize), offset_(offset) {}
  const char* name() const override { return "blockwise8_quantize"; }
  std::vector<Attr> attrs() const override { return {{"blocksize", blocksize_}, {"offset", static_cast<double>(offset_)}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  int64_t blocksize() const { return blocksize_; }
  float offset() const { return offset_; }

 private:
  int64_t blocksize_;
  float offset_;
};

// codes u8 (n), absmax f32 (ceil(n/blocksize)), code f32 (256) -> f32 (n).
class Blockwise8bitDequantize : public Primitive {
 public:
  explicit Blockwise8bitDequantize(int64_t blocksize) : blocksize_(blocksize) {}
  const char* name() const override { return "blockwise8_dequantize"; }
  std::vector<Attr> attrs() const override { return {{"blocksize", blocksize_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  int64_t blocksize() const { return blocksize_; }

 private:
  int64_t blocksize_;
};

// packed u8, absmax (u8 with double_quant, else f32) [, nested_absmax f32, nested_code f32 (256)]
// -> `shape` of dtype `out`. Inputs contiguous. The scale of block b is decoded inline.
class NF4Dequantize : public Primitive {
 public:
  NF4Dequantize(Shape shape, DType out, int64_t blocksize, int64_t nested_blocksize, float offset, bool double_quant)
      : shape_(std::move(shape)), out_(out), blocksize_(blocksize), nested_blocksize_(nested_blocksize),
        offset_(offset), double_quant_(double_quant) {}
  const char* name() const override { return "nf4_dequantize"; }
  std::vector<Attr> attrs() const override {
    return {{"shape", shape_},
            {"out", out_},
            {"blocksize", blocksize_},
            {"nested_blocksize", nested_blocksize_},
            {"offset", static_cast<double>(offset_)},
            {"double_quant", double_quant_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  const Shape& shape() const { return shape_; }
  DType out_dtype() const { return out_; }
  int64_t blocksize() const { return blocksize_; }
  int64_t nested_blocksize() const { return nested_blocksize_; }
  float offset() const { return offset_; }
  bool double_quant() const { return double_quant_; }

 private:
  Shape shape_;
  DType out_;
  int64_t blocksize_, nested_blocksize_;
  float offset_;
  bool double_quant_;
};

}  // namespace kiln::prim

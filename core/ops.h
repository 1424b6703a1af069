// Every public op of kiln, as free functions. Each builds a Primitive and passes it through
// dispatch(); the families live in core/ops/*.cpp with their primitives and vjps.
// Binary ops broadcast numpy-style and need operands of one dtype (a double scalar takes the
// tensor's dtype). Float ops compute in f32 for bf16/f16 (f64 for f64).
#pragma once
#include <optional>
#include <vector>

#include "core/random.h"
#include "core/tensor.h"

namespace kiln {

// ---- creation (core/ops/creation.cpp)
Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = kCPU);
Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = kCPU);
Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = kCPU);
Tensor scalar_tensor(double value, DType dtype = DType::f32, Device device = kCPU);  // 0-d
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
Tensor full_like(const Tensor& t, double value);
Tensor empty_like(const Tensor& t);
// [start, end) by step; dtype i64 by default.
Tensor arange(double start, double end, double step = 1.0, DType dtype = DType::i64, Device device = kCPU);
Tensor arange(int64_t end, DType dtype = DType::i64, Device device = kCPU);
// Philox random numbers (core/random.h): same seed -> same numbers on every backend.
Tensor rand(const Shape& shape, DType dtype = DType::f32, Device device = kCPU, Generator* gen = nullptr);   // U[0,1)
Tensor randn(const Shape& shape, DType dtype = DType::f32, Device device = kCPU, Generator* gen = nullptr);  // N(0,1)
Tensor randint(int64_t low, int64_t high, const Shape& shape, DType dtype = DType::i64, Device device = kCPU,
               Generator* gen = nullptr);  // [low, high)
// Keep-mask for dropout: true with probability 1-p.
Tensor dropout_mask(const Shape& shape, double p, Device device = kCPU, Generator* gen = nullptr);
// Zeroes each element with probability p and scales the rest by 1/(1-p); identity when !training.
Tensor dropout(const Tensor& x, double p, bool training = true, Generator* gen = nullptr);

// ---- views and shape ops (core/ops/view.cpp); views share storage with their input
Tensor reshape(const Tensor& x, const Shape& shape);  // one dim may be -1; copies if not viewable
Tensor view(const Tensor& x, const Shape& shape);     // error if not viewable without a copy
Tensor permute(const Tensor& x, const std::vector<int64_t>& dims);
Tensor transpose(const Tensor& x, int64_t d0, int64_t d1);
Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end, int64_t step = 1);  // python-style clamping
Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length);
Tensor select(const Tensor& x, int64_t dim, int64_t index);
Tensor expand(const Tensor& x, const Shape& shape);  // -1 keeps a dim
Tensor broadcast_to(const Tensor& x, const Shape& shape);
Tensor unsqueeze(const Tensor& x, int64_t dim);
Tensor squeeze(const Tensor& x, int64_t dim);
Tensor flatten(const Tensor& x, int64_t start = 0, int64_t end = -1);
Tensor contiguous(const Tensor& x);
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);
Tensor stack(const std::vector<Tensor>& xs, int64_t dim);
std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim);  // last piece may be smaller
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim);
std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim);
// The gradient of slice(): zeros of `input_shape` with `grad` at elements start, start+step, ... of dim.
Tensor slice_backward(const Tensor& grad, const Shape& input_shape, int64_t dim, int64_t start, int64_t step);
// Sum `x` down to `shape` (the reverse of broadcasting); used by vjps of broadcasting ops.
Tensor sum_to(const Tensor& x, const Shape& shape);
// Device and dtype moves and copies (core/ops/copy.cpp)
Tensor to_device(const Tensor& x, Device device);
Tensor cast(const Tensor& x, DType dtype);
void copy_(const Tensor& dst, const Tensor& src);  // src broadcasts to dst; dtype/device may differ
void fill_(const Tensor& dst, double value);

// ---- elementwise (core/ops/elementwise.cpp)
Tensor neg(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor sign(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor sin(const Tensor& x);
Tensor cos(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor erf(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor silu(const Tensor& x);
Tensor relu(const Tensor& x);
Tensor gelu(const Tensor& x);  // exact (erf) form
Tensor square(const Tensor& x);

Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor pow(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double b);
Tensor sub(const Tensor& a, double b);
Tensor mul(const Tensor& a, double b);
Tensor div(const Tensor& a, double b);
Tensor pow(const Tensor& a, double b);
Tensor maximum(const Tensor& a, double b);
Tensor minimum(const Tensor& a, double b);
// comparisons give bool tensors
Tensor eq(const Tensor& a, const Tensor& b);
Tensor ne(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor gt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);
Tensor eq(const Tensor& a, double b);
Tensor ne(const Tensor& a, double b);
Tensor lt(const Tensor& a, double b);
Tensor le(const Tensor& a, double b);
Tensor gt(const Tensor& a, double b);
Tensor ge(const Tensor& a, double b);
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);  // cond bool; a, b one dtype

Tensor operator-(const Tensor& x);
Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator+(const Tensor& a, double b);
Tensor operator-(const Tensor& a, double b);
Tensor operator*(const Tensor& a, double b);
Tensor operator/(const Tensor& a, double b);
Tensor operator+(double a, const Tensor& b);
Tensor operator-(double a, const Tensor& b);
Tensor operator*(double a, const Tensor& b);
Tensor operator/(double a, const Tensor& b);

// ---- reductions (core/ops/reduce.cpp); empty dims = all dims
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor amin(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor argmax(const Tensor& x, int64_t dim, bool keepdim = false);  // i64; first maximum
Tensor logsumexp(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim = false);
Tensor softmax(const Tensor& x, int64_t dim);
Tensor log_softmax(const Tensor& x, int64_t dim);

// ---- linear algebra (core/ops/matmul.cpp)
// (..., M, K) @ (..., K, N) -> (..., M, N), batch dims broadcast; both at least 2-d.
Tensor matmul(const Tensor& a, const Tensor& b);
Tensor matmul(const Tensor& a, const Tensor& b, double alpha);  // alpha (a @ b), scaled in the GEMM
// alpha (a @ b) + c in the GEMM (c: the product's shape), rounded once
Tensor matmul_add(const Tensor& a, const Tensor& b, const Tensor& c, double alpha = 1.0);
// out = a @ b, or out += a @ b with `accumulate` (the addend of the GEMM, one rounding), written into
// `out` (contiguous, the product's shape and dtype): no new buffer. Not recorded by autograd.
void matmul_into(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate = false);

// ---- neural-network ops, one family each in core/ops/: embedding (indexing.cpp), rms_norm (norm.cpp),
// rotary_embedding (rope.cpp), scaled_dot_product_attention (attention.cpp), cross_entropy (loss.cpp),
// swiglu (activation.cpp). Each fused op has a composite fallback made of primitive ops (the
// *_composite functions), which tests compare against.
Tensor embedding(const Tensor& weight, const Tensor& ids);  // (V, D), int (...) -> (..., D)
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps);  // normalises the last dim
Tensor rms_norm_composite(const Tensor& x, const Tensor& weight, double eps);
// x (..., T, D) rotated by half-split pairs (x[i], x[i + D/2]) with cos/sin (T, D/2) (Llama/HF layout).
Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin);
Tensor rotary_embedding_composite(const Tensor& x, const Tensor& cos, const Tensor& sin);
// q (B, Hq, T, D), k/v (B, Hkv, S, D), Hq % Hkv == 0 -> (B, Hq, T, D). Causal aligns the last query
// with the last key. scale defaults to 1/sqrt(D).
Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal = true,
                                    std::optional<double> scale = std::nullopt);
Tensor scaled_dot_product_attention_composite(const Tensor& q, const Tensor& k, const Tensor& v, bool causal = true,
                                              std::optional<double> scale = std::nullopt);
enum class Reduction { none, sum, mean };
// logits (N, V) float, targets (N) int; targets == ignore_index contribute nothing; mean divides by
// the number of non-ignored targets. Out-of-range targets are an error.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                     Reduction reduction = Reduction::mean);
Tensor cross_entropy_composite(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                               Reduction reduction = Reduction::mean);
// cross_entropy for targets the caller has already validated (each ignore_index or in [0, V), e.g.
// checked once on the host): skips the device-side check, which on CUDA costs a host synchronisation
// per call. An invalid target is then not reported and gives an unspecified loss (never an
// out-of-bounds read). The backward of either form never re-checks.
Tensor cross_entropy_unchecked(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                               Reduction reduction = Reduction::mean);
// Cross-entropy's loss and gradient in one pass, in place, for a chunked loss head: logits (N, V) float
// (contiguous), targets (N) int already validated (each ignore_index or in [0, V)), scale a 0-d float
// tensor. Per row, with lse = logsumexp(row), s = label_smoothing, z = z_loss_weight: returns the
// loss (1 - s)(lse - x_t) + s(lse - mean(row)) + z lse^2 as (N) in the compute dtype (f32; f64 for
// f64) and overwrites the row with scale * d(loss)/d(row) = scale * (softmax (1 + 2 z lse) - s / V
// - (1 - s) onehot(t)); ignored rows get loss 0 and a zero gradient. One read of the logits for the
// statistics, one for the gradient; no second (N, V) buffer.
Tensor cross_entropy_loss_grad_(const Tensor& logits, const Tensor& targets, const Tensor& scale,
                                int64_t ignore_index = -100, double label_smoothing = 0.0, double z_loss_weight = 0.0);
// silu(gate) * up for gate and up of one shape and float dtype (Llama's MLP activation).
Tensor swiglu(const Tensor& gate, const Tensor& up);
Tensor swiglu_composite(const Tensor& gate, const Tensor& up);

}  // namespace kiln

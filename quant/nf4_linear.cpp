// The NF4 linear op: y = x @ dequantize_nf4(W)^T (+ bias) as a custom autograd Function that saves
// nothing dequantised. Forward dequantises W, multiplies and drops it; backward dequantises W again
// for the input gradient (the frozen base gets no weight gradient; a trainable bias gets its sum), adding
// the gradient gathered for the input so far in that GEMM's epilogue.
// Given W already dequantised (`dense`), both multiply by that instead. A residual input is the forward
// GEMM's addend (its gradient is the output's).
#include "autograd/function.h"
#include "quant/nf4.h"

namespace kiln::quant {
namespace {

class NF4LinearFunction : public autograd::Function {
 public:
  NF4LinearFunction(NF4Weight w, Tensor dense, Shape x_shape, bool bias, bool residual)
      : w_(std::move(w)), dense_(std::move(dense)), x_shape_(std::move(x_shape)), bias_(bias), residual_(residual) {}
  const char* name() const override { return "nf4_linear"; }
  // Backward reads W (packed or given) and the gradient only.
  bool backward_reads_input(size_t) const override { return false; }
  bool backward_reads_outputs() const override { return false; }

  // inputs: x (..., K) [, bias (N)] [, residual (..., N)]
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override {
    const Tensor& x = in[0];
    const int64_t k = w_.shape[1], n = w_.shape[0];
    Tensor x2 = reshape(x, {-1, k});  // (M, K)
    // (M, K) @ (K, N) [+ residual (M, N)]; a dequantised (N, K) weight dies here
    Tensor y = residual_ ? matmul_add(x2, weight(x.dtype()).t(), reshape(in.back(), {-1, n}))
                         : matmul(x2, weight(x.dtype()).t());
    if (bias_) y = add(y, in[1]);
    Shape out_shape(x_shape_.begin(), x_shape_.end() - 1);
    out_shape.push_back(n);
    return {reshape(y, out_shape)};
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grads) override {
    std::vector<Tensor> none(needs_input_grad().size());
    return backward_accumulating(grads, none);
  }

  // The input gradient takes what was gathered for x (a LoRA path's, say) as its GEMM's addend.
  std::vector<Tensor> backward_accumulating(const std::vector<Tensor>& grads, std::vector<Tensor>& addends) override {
    const Tensor& g = grads[0];  // (..., N)
    const int64_t n = w_.shape[0], k = w_.shape[1];
    std::vector<Tensor> out(needs_input_grad().size());
    Tensor g2 = reshape(g, {-1, n});  // (M, N)
    if (needs_input_grad()[0]) {
      Tensor& a = addends[0];  // (..., K) or undefined
      if (a.defined() && a.shape() == x_shape_ && a.dtype() == g.dtype() && a.device() == g.device() &&
          a.is_contiguous()) {
        out[0] = reshape(matmul_add(g2, weight(g.dtype()), reshape(a, {-1, k})), x_shape_);  // (M, N) @ (N, K) + a
        a = Tensor();
      } else {
        out[0] = reshape(matmul(g2, weight(g.dtype())), x_shape_);  // (M, N) @ (N, K)
      }
    }
    if (bias_ && needs_input_grad()[1]) out[1] = sum(g2, {0});
    if (residual_ && needs_input_grad().back()) out.back() = g;
    return out;
  }

 private:
  Tensor weight(DType dtype) const { return dense_.defined() ? dense_ : dequantize_nf4(w_, dtype); }  // (N, K)

  NF4Weight w_;  // packed bytes and scales only (shared storage)
  Tensor dense_;  // (N, K) dequantised by the caller, or undefined
  Shape x_shape_;
  bool bias_, residual_;  // which optional inputs follow x
};

}  // namespace

Tensor nf4_linear(const Tensor& x, const NF4Weight& w, const Tensor& bias, const Tensor& dense, const Tensor& residual) {
  const char* op = "nf4_linear";
  KILN_CHECK(x.defined(), op, "input is undefined");
  KILN_CHECK(w.shape.size() == 2, op, "weight must be 2-d (N, K), found shape ({})", fmt::join(w.shape, ", "));
  KILN_CHECK(x.dim() >= 1 && x.shape().back() == w.shape[1], op, "input (..., {}) expected for weight ({}, {}), found ({})",
             w.shape[1], w.shape[0], w.shape[1], fmt::join(x.shape(), ", "));
  KILN_CHECK(x.dtype() == DType::bf16 || x.dtype() == DType::f16 || x.dtype() == DType::f32, op,
             "input must be bf16, f16 or f32, found {}", dtype_name(x.dtype()));
  KILN_CHECK(x.device() == w.device(), op, "input is on {}, weight on {}", x.device().str(), w.device().str());
  w.validate(op);
  std::vector<Tensor> inputs = {x};
  if (bias.defined()) {
    KILN_CHECK(bias.dim() == 1 && bias.size(0) == w.shape[0], op, "bias must be ({}), found ({})", w.shape[0],
               fmt::join(bias.shape(), ", "));
    KILN_CHECK(bias.dtype() == x.dtype(), op, "bias dtype {} differs from the input's {}", dtype_name(bias.dtype()),
               dtype_name(x.dtype()));
    inputs.push_back(bias);
  }
  if (dense.defined()) {
    KILN_CHECK(dense.shape() == w.shape && dense.dtype() == x.dtype() && dense.device() == x.device(), op,
               "the dequantised weight must be ({}, {}) {} on {}, found {} {} on {}", w.shape[0], w.shape[1],
               dtype_name(x.dtype()), x.device().str(), shape_str(dense.shape()), dtype_name(dense.dtype()),
               dense.device().str());
  }
  if (residual.defined()) {
    Shape out_shape(x.shape().begin(), x.shape().end() - 1);
    out_shape.push_back(w.shape[0]);
    KILN_CHECK(residual.shape() == out_shape && residual.dtype() == x.dtype() && residual.device() == x.device(), op,
               "the residual must be {} {} on {}, found {} {} on {}", shape_str(out_shape), dtype_name(x.dtype()),
               x.device().str(), shape_str(residual.shape()), dtype_name(residual.dtype()), residual.device().str());
    KILN_CHECK(residual.is_contiguous(), op, "the residual must be contiguous (it is the GEMM's addend)");
    inputs.push_back(residual);
  }
  auto fn = std::make_shared<NF4LinearFunction>(w, dense.defined() ? dense.detach() : Tensor(), x.shape(), bias.defined(),
                                                residual.defined());
  return autograd::apply(fn, inputs)[0];
}

}  // namespace kiln::quant

// Linear, Embedding, RMSNorm and the rotary embedding (with llama3 frequency scaling).
#include "nn/layers.h"

#include <cmath>
#include <numbers>

#include "autograd/grad_mode.h"
#include "core/ops.h"

namespace kiln::nn {

namespace {

// A tensor of `shape` filled per `init`; kaiming bounds use `fan_in`.
Tensor init_tensor(const Shape& shape, int64_t fan_in, DType dtype, Device device, const Init& init) {
  autograd::NoGradGuard no_grad;
  switch (init.kind) {
    case Init::Kind::zeros:
      return zeros(shape, dtype, device);
    case Init::Kind::uninitialized:
      return empty(shape, dtype, device);
    case Init::Kind::normal:
      return cast(mul(randn(shape, DType::f32, device, init.gen), init.std), dtype);
    case Init::Kind::kaiming_uniform: {
      // torch's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      return cast(sub(mul(rand(shape, DType::f32, device, init.gen), 2.0 * bound), bound), dtype);
    }
  }
  KILN_FAIL("init", "unknown init kind");
}

}  // namespace

Linear::Linear(int64_t in_features, int64_t out_features, bool bias, DType dtype, Device device, Init init)
    : LinearBase(in_features, out_features) {
  KILN_CHECK(in_features > 0 && out_features > 0, "Linear", "expected positive sizes, found in {} out {}",
             in_features, out_features);
  KILN_CHECK(is_floating(dtype), "Linear", "expected a floating dtype, found {}", dtype_name(dtype));
  register_parameter("weight", init_tensor({out_features, in_features}, in_features, dtype, device, init));
  if (bias) {
    Init b = init;
    if (b.kind == Init::Kind::normal) b.kind = Init::Kind::zeros;  // HF's Llama init zeroes biases
    register_parameter("bias", init_tensor({out_features}, in_features, dtype, device, b));
  }
}

Tensor Linear::forward(const Tensor& x) {
  const Tensor w = weight();  // (out, in)
  KILN_CHECK(x.dim() >= 1 && x.shape().back() == in_features_, "Linear", "expected input (..., {}), found {}",
             in_features_, shape_str(x.shape()));
  Tensor y = matmul(x.dim() == 1 ? unsqueeze(x, 0) : x, transpose(w, 0, 1));  // (..., out)
  if (x.dim() == 1) y = squeeze(y, 0);
  const Tensor b = bias();
  return b.defined() ? add(y, b) : y;
}

Tensor LinearBase::residual_add(const Tensor& residual, const Tensor& x) {
  return has_forward_hooks() ? add(residual, (*this)(x)) : forward_add(x, residual);
}

Tensor LinearBase::forward_add(const Tensor& x, const Tensor& residual) { return add(residual, forward(x)); }

Tensor Linear::forward_add(const Tensor& x, const Tensor& residual) {
  if (bias().defined() || x.dim() < 2 || !gemm_addend_fits(residual, x, out_features_)) return LinearBase::forward_add(x, residual);
  KILN_CHECK(x.shape().back() == in_features_, "Linear", "expected input (..., {}), found {}", in_features_,
             shape_str(x.shape()));
  return matmul_add(x, transpose(weight(), 0, 1), residual);  // (..., in) @ (in, out) + (..., out)
}

bool gemm_addend_fits(const Tensor& residual, const Tensor& x, int64_t out) {
  if (!residual.defined() || !x.defined() || x.dim() < 1 || residual.dtype() != x.dtype() ||
      residual.device() != x.device() || residual.dim() != x.dim() || !residual.is_contiguous())
    return false;
  Shape want(x.shape().begin(), x.shape().end() - 1);
  want.push_back(out);
  return residual.shape() == want;
}

Embedding::Embedding(int64_t num_embeddings, int64_t dim, DType dtype, Device device, Init init) {
  KILN_CHECK(num_embeddings > 0 && dim > 0, "Embedding", "expected positive sizes, found {} x {}", num_embeddings, dim);
  if (init.kind == Init::Kind::kaiming_uniform) init.kind = Init::Kind::normal, init.std = 1.0;  // torch's N(0, 1)
  register_parameter("weight", init_tensor({num_embeddings, dim}, dim, dtype, device, init));
}

Tensor Embedding::forward(const Tensor& ids) { return embedding(weight(), ids); }

RMSNorm::RMSNorm(int64_t dim, double eps, DType dtype, Device device) : eps_(eps) {
  KILN_CHECK(dim > 0 && eps >= 0, "RMSNorm", "expected dim > 0 and eps >= 0, found {} and {}", dim, eps);
  register_parameter("weight", ones({dim}, dtype, device));
}

Tensor RMSNorm::forward(const Tensor& x) { return rms_norm(x, parameter("weight"), eps_); }

std::vector<double> rope_inverse_frequencies(int64_t head_dim, double theta, const std::optional<RopeScaling>& scaling) {
  KILN_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope", "head_dim must be even and positive, found {}", head_dim);
  KILN_CHECK(theta > 1, "rope", "rope_theta must be > 1, found {}", theta);
  std::vector<double> inv(static_cast<size_t>(head_dim / 2));
  for (size_t i = 0; i < inv.size(); ++i)
    inv[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
  if (!scaling) return inv;
  const RopeScaling& s = *scaling;
  KILN_CHECK(s.factor > 0 && s.high_freq_factor > s.low_freq_factor && s.low_freq_factor > 0 &&
                 s.original_max_position_embeddings > 0,
             "rope", "llama3 rope_scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
             "original_max_position_embeddings > 0, found {}, {}, {}, {}", s.factor, s.high_freq_factor,
             s.low_freq_factor, s.original_max_position_embeddings);
  // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
  const double old_len = static_cast<double>(s.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / s.low_freq_factor;
  const double high_freq_wavelen = old_len / s.high_freq_factor;
  for (double& f : inv) {
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen > low_freq_wavelen) {
      f /= s.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1 - smooth) * f / s.factor + smooth * f;
    }
  }
  return inv;
}

RotaryEmbedding::RotaryEmbedding(int64_t head_dim, double theta, std::optional<RopeScaling> scaling)
    : head_dim_(head_dim), inv_freq_(rope_inverse_frequencies(head_dim, theta, scaling)) {}

std::pair<Tensor, Tensor> RotaryEmbedding::tables(int64_t start, int64_t length, Device device) {
  KILN_CHECK(start >= 0 && length >= 0, "rope", "positions must be non-negative, found start {} length {}", start, length);
  const int64_t need = start + length;
  Tables* found = nullptr;
  for (Tables& t : cache_)
    if (t.device == device) found = &t;
  if (!found || found->cos.size(0) < need) {
    // Grow in powers of two so generation does not rebuild the table every token.
    int64_t n = 64;
    while (n < need) n *= 2;
    const int64_t half = head_dim_ / 2;
    std::vector<float> c(static_cast<size_t>(n * half)), s(c.size());  // (n, half)
    for (int64_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(p) * inv_freq_[static_cast<size_t>(i)];
        c[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
        s[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
      }
    Tensor ct = from_vector(c, {n, half}, device);
    Tensor st = from_vector(s, {n, half}, device);
    if (found) {
      found->cos = ct, found->sin = st;
    } else {
      cache_.push_back({device, ct, st});
      found = &cache_.back();
    }
  }
  return {narrow(found->cos, 0, start, length), narrow(found->sin, 0, start, length)};
}

Tensor RotaryEmbedding::apply(const Tensor& x, int64_t start) {
  KILN_CHECK(x.dim() >= 2 && x.shape().back() == head_dim_, "rope", "expected x (..., T, {}), found {}", head_dim_,
             shape_str(x.shape()));
  auto [c, s] = tables(start, x.size(-2), x.device());
  return rotary_embedding(x, c, s);
}

Tensor RotaryEmbedding::apply_heads_last(const Tensor& x, int64_t start) {
  KILN_CHECK(x.dim() >= 3 && x.shape().back() == head_dim_, "rope", "expected x (..., T, H, {}), found {}", head_dim_,
             shape_str(x.shape()));
  auto [c, s] = tables(start, x.size(-3), x.device());       // (T, D/2)
  return rotary_embedding(x, unsqueeze(c, -2), unsqueeze(s, -2));  // tables (T, 1, D/2) against x (..., T, H, D)
}

}  // namespace kiln::nn

// zeros/ones/full, arange, rand/randn/randint, dropout and the *_like helpers.
#include "core/ops/creation.h"

#include <cmath>

#include "core/dispatch.h"
#include "core/ops.h"
#include "core/ops/copy.h"

namespace kiln {
namespace prim {

std::vector<TensorMeta> Arange::infer(const std::vector<Tensor>&) const { return {{{n_}, dtype_, device_}}; }

std::vector<TensorMeta> Random::infer(const std::vector<Tensor>&) const {
  for (int64_t d : shape_) KILN_CHECK(d >= 0, "random", "negative dimension in shape {}", shape_str(shape_));
  return {{shape_, dtype_, device_}};
}

std::vector<TensorMeta> Dropout::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(is_floating(in[0].dtype()), "dropout", "expected a floating tensor, got {}", dtype_name(in[0].dtype()));
  return {{in[0].shape(), in[0].dtype(), in[0].device()}};
}
std::vector<Tensor> Dropout::vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                                 const std::vector<bool>&) const {
  return {dispatch1(std::make_shared<const Dropout>(p_, seed_, offset_), {cot[0]})};
}

}  // namespace prim

namespace {
Generator& gen_or_default(Generator* gen) { return gen ? *gen : default_generator(); }

Tensor random(prim::RandomKind kind, const Shape& shape, DType dtype, Device device, Generator* gen, int64_t low = 0,
              int64_t high = 0, double p = 0.0) {
  Generator& g = gen_or_default(gen);
  return dispatch1(std::make_shared<const prim::Random>(kind, shape, dtype, device, g.seed(), g.next_offset(), low, high, p), {});
}
}  // namespace

Tensor full(const Shape& shape, double value, DType dtype, Device device) {
  for (int64_t d : shape) KILN_CHECK(d >= 0, "full", "negative dimension in shape {}", shape_str(shape));
  return dispatch1(std::make_shared<const prim::Fill>(shape, dtype, device, value), {});
}
Tensor zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor scalar_tensor(double value, DType dtype, Device device) { return full({}, value, dtype, device); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.dtype(), t.device()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), t.dtype(), t.device()); }
Tensor full_like(const Tensor& t, double value) { return full(t.shape(), value, t.dtype(), t.device()); }
Tensor empty_like(const Tensor& t) { return empty(t.shape(), t.dtype(), t.device()); }

Tensor arange(double start, double end, double step, DType dtype, Device device) {
  KILN_CHECK(step != 0 && std::isfinite(step) && std::isfinite(start) && std::isfinite(end), "arange",
             "invalid range start={}, end={}, step={}", start, end, step);
  double count = std::ceil((end - start) / step);
  int64_t n = count > 0 ? static_cast<int64_t>(count) : 0;
  return dispatch1(std::make_shared<const prim::Arange>(start, step, n, dtype, device), {});
}
Tensor arange(int64_t end, DType dtype, Device device) { return arange(0.0, static_cast<double>(end), 1.0, dtype, device); }

Tensor rand(const Shape& shape, DType dtype, Device device, Generator* gen) {
  KILN_CHECK(is_floating(dtype), "rand", "needs a floating dtype, got {}", dtype_name(dtype));
  return random(prim::RandomKind::uniform, shape, dtype, device, gen);
}
Tensor randn(const Shape& shape, DType dtype, Device device, Generator* gen) {
  KILN_CHECK(is_floating(dtype), "randn", "needs a floating dtype, got {}", dtype_name(dtype));
  return random(prim::RandomKind::normal, shape, dtype, device, gen);
}
Tensor randint(int64_t low, int64_t high, const Shape& shape, DType dtype, Device device, Generator* gen) {
  KILN_CHECK(low < high, "randint", "empty range [{}, {})", low, high);
  KILN_CHECK(dtype != DType::boolean, "randint", "needs a numeric dtype, got bool");
  return random(prim::RandomKind::integer, shape, dtype, device, gen, low, high);
}
Tensor dropout_mask(const Shape& shape, double p, Device device, Generator* gen) {
  KILN_CHECK(p >= 0.0 && p <= 1.0, "dropout_mask", "p must be in [0, 1], got {}", p);
  return random(prim::RandomKind::keep_mask, shape, DType::boolean, device, gen, 0, 0, p);
}
Tensor dropout(const Tensor& x, double p, bool training, Generator* gen) {
  KILN_CHECK(p >= 0.0 && p <= 1.0, "dropout", "p must be in [0, 1], got {}", p);
  if (!training || p == 0.0) return x;
  Generator& g = gen_or_default(gen);
  return dispatch1(std::make_shared<const prim::Dropout>(p, g.seed(), g.next_offset()), {x});
}

}  // namespace kiln

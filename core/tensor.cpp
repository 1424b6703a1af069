// Tensor handle methods: metadata, host copies, and sugar over the ops of core/ops.h.
#include "core/tensor.h"

#include <cstring>

#include "core/grad_recorder.h"
#include "core/ops.h"

namespace kiln {

TensorImpl& Tensor::impl_ref() const {
  KILN_CHECK(impl_ != nullptr, "tensor", "use of an undefined tensor");
  return *impl_;
}

int64_t Tensor::size(int64_t d) const { return shape()[static_cast<size_t>(wrap_dim(d, dim(), "size"))]; }

bool Tensor::is_contiguous() const {
  const TensorImpl& t = impl_ref();
  int64_t expected = 1;
  for (size_t i = t.shape.size(); i-- > 0;) {
    if (t.shape[i] == 1) continue;
    if (t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  const TensorImpl& t = impl_ref();
  KILN_CHECK(t.storage != nullptr, "data", "tensor has no storage");
  return static_cast<char*>(t.storage->data()) + t.offset * static_cast<int64_t>(itemsize(t.dtype));
}

template <class T> std::vector<T> Tensor::to_vector() const {
  KILN_CHECK(dtype_v<T> == dtype(), "to_vector", "tensor has dtype {}, asked for {}", dtype_name(dtype()), dtype_name(dtype_v<T>));
  Tensor host = device().is_cpu() ? *this : to(kCPU);
  if (!host.is_contiguous()) host = kiln::contiguous(host);
  std::vector<T> out(static_cast<size_t>(numel()));
  if (!out.empty()) std::memcpy(static_cast<void*>(out.data()), host.raw_data(), out.size() * sizeof(T));
  return out;
}

template <> std::vector<bool> Tensor::to_vector<bool>() const {
  KILN_CHECK(dtype() == DType::boolean, "to_vector", "tensor has dtype {}, asked for bool", dtype_name(dtype()));
  Tensor host = device().is_cpu() ? *this : to(kCPU);
  if (!host.is_contiguous()) host = kiln::contiguous(host);
  const bool* p = static_cast<const bool*>(host.raw_data());
  return std::vector<bool>(p, p + numel());
}

template <class T> T Tensor::item() const {
  KILN_CHECK(numel() == 1, "item", "tensor of shape {} has {} elements, expected 1", shape_str(shape()), numel());
  T out{};
  visit_dtype(dtype(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    S v = to_vector<S>()[0];
    out = static_cast<T>(static_cast<compute_t<S>>(v));
  });
  return out;
}

#define KILN_INSTANTIATE(T) \
  template std::vector<T> Tensor::to_vector<T>() const; \
  template T Tensor::item<T>() const;
KILN_INSTANTIATE(double)
KILN_INSTANTIATE(float)
KILN_INSTANTIATE(int64_t)
KILN_INSTANTIATE(int32_t)
KILN_INSTANTIATE(uint8_t)
template bool Tensor::item<bool>() const;
template std::vector<bf16> Tensor::to_vector<bf16>() const;
template std::vector<f16> Tensor::to_vector<f16>() const;
#undef KILN_INSTANTIATE

Tensor& Tensor::set_requires_grad(bool r) {
  TensorImpl& t = impl_ref();
  KILN_CHECK(t.grad_fn == nullptr, "requires_grad", "only leaf tensors can change requires_grad; use detach() first");
  KILN_CHECK(!r || is_floating(t.dtype), "requires_grad", "only floating tensors can require grad, this one is {}",
             dtype_name(t.dtype));
  t.requires_grad = r;
  return *this;
}

Tensor Tensor::detach() const {
  const TensorImpl& t = impl_ref();
  auto d = std::make_shared<TensorImpl>();
  d->storage = t.storage;
  d->offset = t.offset;
  d->shape = t.shape;
  d->strides = t.strides;
  d->dtype = t.dtype;
  d->device = t.device;
  return Tensor(d);
}

void Tensor::backward(const Tensor& grad, bool retain_graph, bool create_graph) const {
  GradRecorder* r = grad_recorder();
  KILN_CHECK(r != nullptr, "backward", "autograd is not linked into this program (link kiln_autograd)");
  r->backward(*this, grad, retain_graph, create_graph);
}

Tensor Tensor::to(Device d) const { return d == device() ? *this : to_device(*this, d); }
Tensor Tensor::to(DType d) const { return d == dtype() ? *this : cast(*this, d); }
Tensor Tensor::contiguous() const { return kiln::contiguous(*this); }
Tensor Tensor::clone() const {
  Tensor out = empty_like(*this);
  kiln::copy_(out, *this);
  return out;
}
Tensor& Tensor::copy_(const Tensor& src) { kiln::copy_(*this, src); return *this; }
Tensor& Tensor::fill_(double value) { kiln::fill_(*this, value); return *this; }

Tensor Tensor::reshape(const Shape& s) const { return kiln::reshape(*this, s); }
Tensor Tensor::view(const Shape& s) const { return kiln::view(*this, s); }
Tensor Tensor::permute(const std::vector<int64_t>& dims) const { return kiln::permute(*this, dims); }
Tensor Tensor::transpose(int64_t d0, int64_t d1) const { return kiln::transpose(*this, d0, d1); }
Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const { return kiln::narrow(*this, d, start, length); }
Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const { return kiln::slice(*this, d, start, end, step); }
Tensor Tensor::select(int64_t d, int64_t index) const { return kiln::select(*this, d, index); }
Tensor Tensor::expand(const Shape& s) const { return kiln::expand(*this, s); }
Tensor Tensor::unsqueeze(int64_t d) const { return kiln::unsqueeze(*this, d); }
Tensor Tensor::squeeze(int64_t d) const { return kiln::squeeze(*this, d); }
Tensor Tensor::flatten(int64_t start, int64_t end) const { return kiln::flatten(*this, start, end); }
Tensor Tensor::sum(const std::vector<int64_t>& dims, bool keepdim) const { return kiln::sum(*this, dims, keepdim); }
Tensor Tensor::mean(const std::vector<int64_t>& dims, bool keepdim) const { return kiln::mean(*this, dims, keepdim); }

Tensor placeholder(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) KILN_CHECK(d >= 0, "placeholder", "negative dimension in shape {}", shape_str(shape));
  auto t = std::make_shared<TensorImpl>();
  t->shape = shape;
  t->strides = contiguous_strides(shape);
  t->dtype = dtype;
  t->device = device;
  return Tensor(t);
}

Tensor empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) KILN_CHECK(d >= 0, "empty", "negative dimension in shape {}", shape_str(shape));
  auto t = std::make_shared<TensorImpl>();
  t->storage = allocate_storage(static_cast<size_t>(kiln::numel(shape)) * itemsize(dtype), device);
  t->shape = shape;
  t->strides = contiguous_strides(shape);
  t->dtype = dtype;
  t->device = device;
  return Tensor(t);
}

Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device, std::shared_ptr<void> owner) {
  for (int64_t d : shape) KILN_CHECK(d >= 0, "from_blob", "negative dimension in shape {}", shape_str(shape));
  auto t = std::make_shared<TensorImpl>();
  t->storage = storage_from_blob(data, static_cast<size_t>(kiln::numel(shape)) * itemsize(dtype), device, std::move(owner));
  t->shape = shape;
  t->strides = contiguous_strides(shape);
  t->dtype = dtype;
  t->device = device;
  return Tensor(t);
}

template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& shape, Device device) {
  KILN_CHECK(static_cast<int64_t>(values.size()) == kiln::numel(shape), "from_vector",
             "{} values cannot fill shape {} ({} elements)", values.size(), shape_str(shape), kiln::numel(shape));
  Tensor host = empty(shape, dtype_v<T>, kCPU);
  if (!values.empty()) std::memcpy(host.raw_data(), static_cast<const void*>(values.data()), values.size() * sizeof(T));
  return device.is_cpu() ? host : host.to(device);
}
template Tensor from_vector<double>(const std::vector<double>&, const Shape&, Device);
template Tensor from_vector<float>(const std::vector<float>&, const Shape&, Device);
template Tensor from_vector<bf16>(const std::vector<bf16>&, const Shape&, Device);
template Tensor from_vector<f16>(const std::vector<f16>&, const Shape&, Device);
template Tensor from_vector<int64_t>(const std::vector<int64_t>&, const Shape&, Device);
template Tensor from_vector<int32_t>(const std::vector<int32_t>&, const Shape&, Device);
template Tensor from_vector<uint8_t>(const std::vector<uint8_t>&, const Shape&, Device);

// std::vector<bool> is bit-packed, so bool tensors come from a byte vector.
template <> Tensor from_vector<bool>(const std::vector<bool>& values, const Shape& shape, Device device) {
  KILN_CHECK(static_cast<int64_t>(values.size()) == kiln::numel(shape), "from_vector",
             "{} values cannot fill shape {} ({} elements)", values.size(), shape_str(shape), kiln::numel(shape));
  Tensor host = empty(shape, DType::boolean, kCPU);
  bool* p = static_cast<bool*>(host.raw_data());
  for (size_t i = 0; i < values.size(); ++i) p[i] = values[i];
  return device.is_cpu() ? host : host.to(device);
}


}  // namespace kiln

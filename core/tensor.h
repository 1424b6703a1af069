// Tensor: a cheap shared handle to a TensorImpl (storage + offset + shape + strides + dtype) with
// the autograd fields (requires_grad, grad, the node that made it). Methods are thin sugar over the
// free functions of core/ops.h, which all pass through the one dispatch point (core/dispatch.h).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/shape.h"
#include "core/storage.h"

namespace kiln {

namespace autograd {
struct Node;
struct GradHooks;
}  // namespace autograd
class Tensor;

struct TensorImpl {
  Storage storage;      // may be null for a tensor with no data yet (tracer tensors)
  int64_t offset = 0;   // in elements
  Shape shape;
  Shape strides;        // in elements
  DType dtype = DType::f32;
  Device device;
  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;
  std::shared_ptr<autograd::Node> grad_fn;  // null for leaves
  int output_nr = 0;                        // which output of grad_fn this is
  std::shared_ptr<autograd::GradHooks> grad_hooks;  // leaves: post-accumulate-grad hooks (autograd/hooks.h)
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  bool defined() const { return impl_ != nullptr; }
  const std::shared_ptr<TensorImpl>& impl() const { return impl_; }
  TensorImpl& impl_ref() const;  // throws on an undefined tensor

  // -- metadata
  const Shape& shape() const { return impl_ref().shape; }
  const Shape& strides() const { return impl_ref().strides; }
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t size(int64_t d) const;
  int64_t numel() const { return kiln::numel(shape()); }
  DType dtype() const { return impl_ref().dtype; }
  Device device() const { return impl_ref().device; }
  int64_t offset() const { return impl_ref().offset; }
  const Storage& storage() const { return impl_ref().storage; }
  bool is_contiguous() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * itemsize(dtype()); }

  // -- raw data (CPU pointers for CPU tensors, device pointers for CUDA tensors)
  void* raw_data() const;
  template <class T> T* data_ptr() const {
    KILN_CHECK(dtype_v<T> == dtype(), "data_ptr", "tensor has dtype {}, asked for {}", dtype_name(dtype()), dtype_name(dtype_v<T>));
    return static_cast<T*>(raw_data());
  }

  // -- host <-> tensor
  template <class T> std::vector<T> to_vector() const;  // any device, any layout; dtype must match T
  template <class T> T item() const;                    // one-element tensor, converted to T
  std::string to_string() const;                        // readable, summarised for big tensors

  // -- autograd
  bool requires_grad() const { return defined() && impl_->requires_grad; }
  Tensor& set_requires_grad(bool r = true);  // leaves of floating dtype only
  bool is_leaf() const { return impl_ref().grad_fn == nullptr; }
  Tensor grad() const { return Tensor(impl_ref().grad); }
  void set_grad(const Tensor& g) { impl_ref().grad = g.impl(); }
  void zero_grad() { impl_ref().grad.reset(); }
  const std::shared_ptr<autograd::Node>& grad_fn() const { return impl_ref().grad_fn; }
  Tensor detach() const;  // shares storage, no history
  // Reverse-mode from this tensor; `grad` defaults to 1 for a one-element tensor.
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false, bool create_graph = false) const;

  // -- conversions and in-place writes (no autograd through in-place writes of tensors that need grad)
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor& copy_(const Tensor& src);
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }

  // -- views and shape ops
  Tensor reshape(const Shape& s) const;
  Tensor view(const Shape& s) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor t() const { return transpose(-2, -1); }
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t dim, int64_t index) const;
  Tensor expand(const Shape& s) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor flatten(int64_t start = 0, int64_t end = -1) const;

  // -- reductions
  Tensor sum(const std::vector<int64_t>& dims = {}, bool keepdim = false) const;
  Tensor mean(const std::vector<int64_t>& dims = {}, bool keepdim = false) const;

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// Makes a tensor of shape `shape` from host values.
template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& shape, Device device = kCPU);
template <> Tensor from_vector<bool>(const std::vector<bool>& values, const Shape& shape, Device device);
template <> std::vector<bool> Tensor::to_vector<bool>() const;
// A tensor viewing `data` (not copied); `owner` is kept alive as long as any view of it.
Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device = kCPU, std::shared_ptr<void> owner = nullptr);
// A fresh tensor with uninitialised contiguous storage.
Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = kCPU);
// A contiguous tensor with shape, dtype and device but no storage: what a tracer hands out in place of
// results it does not compute. Views of it work; reading or writing its data is an error.
Tensor placeholder(const Shape& shape, DType dtype, Device device);

std::ostream& operator<<(std::ostream& os, const Tensor& t);

}  // namespace kiln

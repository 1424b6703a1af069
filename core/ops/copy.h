// Copy primitives: Copy (contiguous / cast / device move / copy_ into an existing tensor), Fill,
// Cat and SliceBackward (the scatter that undoes a slice).
#pragma once
#include "core/primitive.h"

namespace kiln::prim {

// out (shape, dtype, device) = src broadcast to shape, converted.
class Copy final : public Primitive {
 public:
  Copy(Shape shape, DType dtype, Device device, DType src_dtype, Device src_device)
      : shape_(std::move(shape)), dtype_(dtype), device_(device), src_dtype_(src_dtype), src_device_(src_device) {}
  const char* name() const override { return "copy"; }
  std::vector<Attr> attrs() const override {
    return {{"shape", shape_}, {"dtype", dtype_}, {"device", device_}, {"src_dtype", src_dtype_},
            {"src_device", src_device_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  Device kernel_device(const std::vector<Tensor>& inputs, const std::vector<TensorMeta>& outputs) const override;
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;
  DType dtype() const { return dtype_; }

 private:
  Shape shape_;
  DType dtype_;
  Device device_;
  DType src_dtype_;
  Device src_device_;
};

class Fill final : public Primitive {
 public:
  Fill(Shape shape, DType dtype, Device device, double value)
      : shape_(std::move(shape)), dtype_(dtype), device_(device), value_(value) {}
  const char* name() const override { return "fill"; }
  std::vector<Attr> attrs() const override {
    return {{"shape", shape_}, {"dtype", dtype_}, {"device", device_}, {"value", value_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  double value() const { return value_; }

 private:
  Shape shape_;
  DType dtype_;
  Device device_;
  double value_;
};

class Cat final : public Primitive {
 public:
  explicit Cat(int64_t dim) : dim_(dim) {}
  const char* name() const override { return "cat"; }
  std::vector<Attr> attrs() const override { return {{"dim", dim_}, {"sizes", sizes_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>& wanted) const override;
  int64_t dim() const { return dim_; }
  void set_sizes(std::vector<int64_t> sizes) { sizes_ = std::move(sizes); }

 private:
  int64_t dim_;
  std::vector<int64_t> sizes_;  // size of each input along dim, for the vjp
};

class SliceBackward final : public Primitive {
 public:
  SliceBackward(Shape in, int64_t dim, int64_t start, int64_t step)
      : in_(std::move(in)), dim_(dim), start_(start), step_(step) {}
  const char* name() const override { return "slice_backward"; }
  std::vector<Attr> attrs() const override { return {{"shape", in_}, {"dim", dim_}, {"start", start_}, {"step", step_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;
  int64_t dim() const { return dim_; }
  int64_t start() const { return start_; }
  int64_t step() const { return step_; }

 private:
  Shape in_;
  int64_t dim_, start_, step_;
};

}  // namespace kiln::prim

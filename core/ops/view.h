// View primitives: they alias their input's storage with new shape/strides/offset and run no
// kernel. Each carries the input shape its vjp needs.
#pragma once
#include "core/primitive.h"

namespace kiln::prim {

// What every view shares: no kernel, and a vjp that reads only the cotangent (and the primitive's attrs).
class ViewPrimitive : public Primitive {
 public:
  bool is_view() const override { return true; }
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
};

class View final : public ViewPrimitive {
 public:
  View(Shape in, Shape out) : in_(std::move(in)), out_(std::move(out)) {}
  const char* name() const override { return "view"; }
  std::vector<Attr> attrs() const override { return {{"in_shape", in_}, {"shape", out_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  Tensor make_view(const std::vector<Tensor>& inputs) const override;
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;

 private:
  Shape in_, out_;
};

class Permute final : public ViewPrimitive {
 public:
  explicit Permute(std::vector<int64_t> dims) : dims_(std::move(dims)) {}
  const char* name() const override { return "permute"; }
  std::vector<Attr> attrs() const override { return {{"dims", dims_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  Tensor make_view(const std::vector<Tensor>& inputs) const override;
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;

 private:
  std::vector<int64_t> dims_;  // wrapped
};

// Elements start, start+step, ... (< end) of one dim; start/end already clamped, step >= 1.
class Slice final : public ViewPrimitive {
 public:
  Slice(Shape in, int64_t dim, int64_t start, int64_t end, int64_t step)
      : in_(std::move(in)), dim_(dim), start_(start), end_(end), step_(step) {}
  const char* name() const override { return "slice"; }
  std::vector<Attr> attrs() const override {
    return {{"in_shape", in_}, {"dim", dim_}, {"start", start_}, {"end", end_}, {"step", step_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  Tensor make_view(const std::vector<Tensor>& inputs) const override;
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;
  int64_t length() const { return end_ <= start_ ? 0 : (end_ - start_ + step_ - 1) / step_; }

 private:
  Shape in_;
  int64_t dim_, start_, end_, step_;
};

class Expand final : public ViewPrimitive {
 public:
  Expand(Shape in, Shape out) : in_(std::move(in)), out_(std::move(out)) {}
  const char* name() const override { return "expand"; }
  std::vector<Attr> attrs() const override { return {{"in_shape", in_}, {"shape", out_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  Tensor make_view(const std::vector<Tensor>& inputs) const override;
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;

 private:
  Shape in_, out_;
};

}  // namespace kiln::prim

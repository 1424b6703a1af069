// Creation primitives with no tensor inputs (Arange, Random) and Dropout, whose mask comes from the
// same Philox stream as Random (core/philox.h documents which words each element reads).
#pragma once
#include "core/primitive.h"

namespace kiln::prim {

class Arange final : public Primitive {
 public:
  Arange(double start, double step, int64_t n, DType dtype, Device device)
      : start_(start), step_(step), n_(n), dtype_(dtype), device_(device) {}
  const char* name() const override { return "arange"; }
  std::vector<Attr> attrs() const override {
    return {{"start", start_}, {"step", step_}, {"n", n_}, {"dtype", dtype_}, {"device", device_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  double start() const { return start_; }
  double step() const { return step_; }

 private:
  double start_, step_;
  int64_t n_;
  DType dtype_;
  Device device_;
};

enum class RandomKind { uniform, normal, integer, keep_mask };
inline const char* random_kind_name(RandomKind k) {
  static const char* const names[] = {"uniform", "normal", "integer", "keep_mask"};
  return names[static_cast<int>(k)];
}

// uniform [0,1), normal N(0,1), integer [low, high), keep_mask (bool, true with prob 1-p).
class Random final : public Primitive {
 public:
  Random(RandomKind kind, Shape shape, DType dtype, Device device, uint64_t seed, uint64_t offset, int64_t low = 0,
         int64_t high = 0, double p = 0.0)
      : kind_(kind), shape_(std::move(shape)), dtype_(dtype), device_(device), seed_(seed), offset_(offset),
        low_(low), high_(high), p_(p) {}
  const char* name() const override { return "random"; }
  std::vector<Attr> attrs() const override {
    return {{"kind", EnumAttr{static_cast<int64_t>(kind_), random_kind_name(kind_)}},
            {"shape", shape_},
            {"dtype", dtype_},
            {"device", device_},
            {"seed", static_cast<int64_t>(seed_)},
            {"offset", static_cast<int64_t>(offset_)},
            {"low", low_},
            {"high", high_},
            {"p", p_}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  RandomKind kind() const { return kind_; }
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  int64_t low() const { return low_; }
  int64_t high() const { return high_; }
  double p() const { return p_; }

 private:
  RandomKind kind_;
  Shape shape_;
  DType dtype_;
  Device device_;
  uint64_t seed_, offset_;
  int64_t low_, high_;
  double p_;
};

// out = x * keep / (1 - p) with keep drawn as Random's keep_mask for (seed, offset) over x's
// elements in row-major order; its vjp is the same op on the gradient (same mask, same scale).
class Dropout final : public Primitive {
 public:
  Dropout(double p, uint64_t seed, uint64_t offset) : p_(p), seed_(seed), offset_(offset) {}
  const char* name() const override { return "dropout"; }
  std::vector<Attr> attrs() const override {
    return {{"p", p_}, {"seed", static_cast<int64_t>(seed_)}, {"offset", static_cast<int64_t>(offset_)}};
  }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  bool vjp_needs_inputs() const override { return false; }
  bool vjp_needs_outputs() const override { return false; }
  std::vector<Tensor> vjp(const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& cot,
                          const std::vector<bool>&) const override;
  double p() const { return p_; }
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }

 private:
  double p_;
  uint64_t seed_, offset_;
};

}  // namespace kiln::prim

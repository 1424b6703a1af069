// Tests of primitive identity (Primitive::equals / hash / attrs): equal ops built separately are equal
// and hash equal, every attribute change and every change of type makes them differ, doubles compare
// bitwise, custom Functions compare by object, and primitives key unordered containers.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "autograd/function.h"
#include "autograd/node.h"
#include "core/ops/activation.h"
#include "core/ops/attention.h"
#include "core/ops/copy.h"
#include "core/ops/creation.h"
#include "core/ops/elementwise.h"
#include "core/ops/indexing.h"
#include "core/ops/loss.h"
#include "core/ops/matmul.h"
#include "core/ops/norm.h"
#include "core/ops/optim.h"
#include "core/ops/reduce.h"
#include "core/ops/rope.h"
#include "core/ops/view.h"
#include "quant/nf4.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

using Factory = std::function<PrimitivePtr()>;
template <class P, class... Args>
Factory make(Args... args) {
  return [=] { return std::make_shared<const P>(args...); };
}

// One family per primitive type: the first entry is the base, each further one changes one attribute.
std::vector<std::vector<Factory>> families() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Device cuda{DeviceType::cuda, 0}, cuda1{DeviceType::cuda, 1};
  AdamWHyper h;
  auto hyper = [&](auto change) {
    AdamWHyper x = h;
    change(x);
    return x;
  };
  auto cat = [](int64_t dim, std::vector<int64_t> sizes) -> Factory {
    return [=] {
      auto p = std::make_shared<prim::Cat>(dim);
      p->set_sizes(sizes);
      return PrimitivePtr(p);
    };
  };
  return {
      // creation
      {make<prim::Arange>(0.0, 1.0, int64_t{5}, DType::f32, kCPU),
       make<prim::Arange>(0.5, 1.0, int64_t{5}, DType::f32, kCPU),
       make<prim::Arange>(0.0, 2.0, int64_t{5}, DType::f32, kCPU),
       make<prim::Arange>(0.0, 1.0, int64_t{6}, DType::f32, kCPU),
       make<prim::Arange>(0.0, 1.0, int64_t{5}, DType::f64, kCPU),
       make<prim::Arange>(0.0, 1.0, int64_t{5}, DType::f32, cuda)},
      {make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::normal, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{3, 2}, DType::f32, kCPU, uint64_t{1}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::bf16, kCPU, uint64_t{1}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, cuda, uint64_t{1}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{2}, uint64_t{0}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{6}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{0},
                          int64_t{-1}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{0},
                          int64_t{0}, int64_t{9}),
       make<prim::Random>(prim::RandomKind::uniform, Shape{2, 3}, DType::f32, kCPU, uint64_t{1}, uint64_t{0},
                          int64_t{0}, int64_t{0}, 0.25)},
      {make<prim::Dropout>(0.1, uint64_t{7}, uint64_t{0}), make<prim::Dropout>(0.2, uint64_t{7}, uint64_t{0}),
       make<prim::Dropout>(0.1, uint64_t{8}, uint64_t{0}), make<prim::Dropout>(0.1, uint64_t{7}, uint64_t{4})},
      // copy
      {make<prim::Copy>(Shape{4}, DType::f32, kCPU, DType::f32, kCPU),
       make<prim::Copy>(Shape{4, 1}, DType::f32, kCPU, DType::f32, kCPU),
       make<prim::Copy>(Shape{4}, DType::f16, kCPU, DType::f32, kCPU),
       make<prim::Copy>(Shape{4}, DType::f32, cuda, DType::f32, kCPU),
       make<prim::Copy>(Shape{4}, DType::f32, kCPU, DType::i64, kCPU),
       make<prim::Copy>(Shape{4}, DType::f32, kCPU, DType::f32, cuda1)},
      {make<prim::Fill>(Shape{3}, DType::f32, kCPU, 1.0), make<prim::Fill>(Shape{4}, DType::f32, kCPU, 1.0),
       make<prim::Fill>(Shape{3}, DType::i32, kCPU, 1.0), make<prim::Fill>(Shape{3}, DType::f32, cuda, 1.0),
       make<prim::Fill>(Shape{3}, DType::f32, kCPU, 2.0), make<prim::Fill>(Shape{3}, DType::f32, kCPU, -0.0),
       make<prim::Fill>(Shape{3}, DType::f32, kCPU, 0.0), make<prim::Fill>(Shape{3}, DType::f32, kCPU, nan)},
      {cat(0, {2, 3}), cat(1, {2, 3}), cat(0, {3, 2}), cat(0, {2, 3, 1})},
      {make<prim::SliceBackward>(Shape{8, 2}, int64_t{0}, int64_t{1}, int64_t{2}),
       make<prim::SliceBackward>(Shape{9, 2}, int64_t{0}, int64_t{1}, int64_t{2}),
       make<prim::SliceBackward>(Shape{8, 2}, int64_t{1}, int64_t{1}, int64_t{2}),
       make<prim::SliceBackward>(Shape{8, 2}, int64_t{0}, int64_t{0}, int64_t{2}),
       make<prim::SliceBackward>(Shape{8, 2}, int64_t{0}, int64_t{1}, int64_t{1})},
      // views
      {make<prim::View>(Shape{2, 3}, Shape{6}), make<prim::View>(Shape{3, 2}, Shape{6}),
       make<prim::View>(Shape{2, 3}, Shape{6, 1})},
      {make<prim::Permute>(std::vector<int64_t>{1, 0, 2}), make<prim::Permute>(std::vector<int64_t>{0, 2, 1}),
       make<prim::Permute>(std::vector<int64_t>{1, 0})},
      {make<prim::Slice>(Shape{8}, int64_t{0}, int64_t{1}, int64_t{7}, int64_t{2}),
       make<prim::Slice>(Shape{9}, int64_t{0}, int64_t{1}, int64_t{7}, int64_t{2}),
       make<prim::Slice>(Shape{8, 1}, int64_t{1}, int64_t{0}, int64_t{1}, int64_t{1}),
       make<prim::Slice>(Shape{8}, int64_t{0}, int64_t{0}, int64_t{7}, int64_t{2}),
       make<prim::Slice>(Shape{8}, int64_t{0}, int64_t{1}, int64_t{8}, int64_t{2}),
       make<prim::Slice>(Shape{8}, int64_t{0}, int64_t{1}, int64_t{7}, int64_t{3})},
      {make<prim::Expand>(Shape{1, 3}, Shape{4, 3}), make<prim::Expand>(Shape{3}, Shape{4, 3}),
       make<prim::Expand>(Shape{1, 3}, Shape{5, 3})},
      // elementwise
      {make<prim::Unary>(UnaryOp::exp), make<prim::Unary>(UnaryOp::log), make<prim::Unary>(UnaryOp::neg)},
      {make<prim::Binary>(BinaryOp::add), make<prim::Binary>(BinaryOp::mul),
       make<prim::Binary>(BinaryOp::add, Shape{2}, Shape{2}), make<prim::Binary>(BinaryOp::add, Shape{2}, Shape{1}),
       make<prim::Binary>(BinaryOp::add, Shape{1}, Shape{2}), make<prim::Binary>(BinaryOp::sub, Shape{2}, Shape{2})},
      {make<prim::Where>()},
      // reductions
      {make<prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{1}, false, Shape{2, 3}),
       make<prim::Reduce>(prim::ReduceKind::mean, std::vector<int64_t>{1}, false, Shape{2, 3}),
       make<prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{0}, false, Shape{2, 3}),
       make<prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{1}, true, Shape{2, 3}),
       make<prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{1}, false, Shape{2, 4})},
      {make<prim::ArgMax>(int64_t{0}, false), make<prim::ArgMax>(int64_t{1}, false),
       make<prim::ArgMax>(int64_t{0}, true)},
      {make<prim::LogSumExp>(std::vector<int64_t>{0}, false), make<prim::LogSumExp>(std::vector<int64_t>{0, 1}, false),
       make<prim::LogSumExp>(std::vector<int64_t>{0}, true)},
      {make<prim::Softmax>(int64_t{1}, false), make<prim::Softmax>(int64_t{0}, false),
       make<prim::Softmax>(int64_t{1}, true)},
      {make<prim::Matmul>(), make<prim::Matmul>(0.5)},
      // optimisers
      {make<prim::MultiTensorL2Norm>()},
      {make<prim::MultiTensorScale>(0.5f), make<prim::MultiTensorScale>(0.25f)},
      {make<prim::AdamWStep>(h, std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(hyper([](AdamWHyper& x) { x.lr = 2e-3; }), std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(hyper([](AdamWHyper& x) { x.beta1 = 0.8; }), std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(hyper([](AdamWHyper& x) { x.beta2 = 0.99; }), std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(hyper([](AdamWHyper& x) { x.eps = 1e-6; }), std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(hyper([](AdamWHyper& x) { x.weight_decay = 0.0; }), std::vector<int64_t>{1, 1}),
       make<prim::AdamWStep>(h, std::vector<int64_t>{1, 2}), make<prim::AdamWStep>(h, std::vector<int64_t>{1})},
      // neural-network ops
      {make<prim::Embedding>()},
      {make<prim::EmbeddingBackward>(int64_t{10}), make<prim::EmbeddingBackward>(int64_t{11})},
      {make<prim::RmsNorm>(1e-5), make<prim::RmsNorm>(1e-6), make<prim::RmsNorm>(nan)},
      {make<prim::RmsNormBackward>(1e-5), make<prim::RmsNormBackward>(1e-6)},
      {make<prim::RotaryEmbedding>()},
      {make<prim::ScaledDotProductAttention>(true, 0.125), make<prim::ScaledDotProductAttention>(false, 0.125),
       make<prim::ScaledDotProductAttention>(true, 0.25)},
      {make<prim::SdpaBackward>(true, 0.125), make<prim::SdpaBackward>(false, 0.125),
       make<prim::SdpaBackward>(true, 0.25)},
      {make<prim::CrossEntropy>(int64_t{-100}, Reduction::mean, true),
       make<prim::CrossEntropy>(int64_t{-1}, Reduction::mean, true),
       make<prim::CrossEntropy>(int64_t{-100}, Reduction::sum, true),
       make<prim::CrossEntropy>(int64_t{-100}, Reduction::mean, false)},
      {make<prim::CrossEntropyBackward>(int64_t{-100}, Reduction::mean, true),
       make<prim::CrossEntropyBackward>(int64_t{-1}, Reduction::mean, true),
       make<prim::CrossEntropyBackward>(int64_t{-100}, Reduction::none, true),
       make<prim::CrossEntropyBackward>(int64_t{-100}, Reduction::mean, false)},
      {make<prim::SwiGlu>()},
      {make<prim::SwiGluBackward>()},
      // quantisation
      {make<prim::NF4Quantize>(int64_t{64}), make<prim::NF4Quantize>(int64_t{128})},
      {make<prim::Blockwise8bitQuantize>(int64_t{256}, 0.5f), make<prim::Blockwise8bitQuantize>(int64_t{128}, 0.5f),
       make<prim::Blockwise8bitQuantize>(int64_t{256}, 0.25f)},
      {make<prim::Blockwise8bitDequantize>(int64_t{256}), make<prim::Blockwise8bitDequantize>(int64_t{64})},
      {make<prim::NF4Dequantize>(Shape{4, 64}, DType::bf16, int64_t{64}, int64_t{256}, 0.5f, true),
       make<prim::NF4Dequantize>(Shape{64, 4}, DType::bf16, int64_t{64}, int64_t{256}, 0.5f, true),
       make<prim::NF4Dequantize>(Shape{4, 64}, DType::f16, int64_t{64}, int64_t{256}, 0.5f, true),
       make<prim::NF4Dequantize>(Shape{4, 64}, DType::bf16, int64_t{128}, int64_t{256}, 0.5f, true),
       make<prim::NF4Dequantize>(Shape{4, 64}, DType::bf16, int64_t{64}, int64_t{128}, 0.5f, true),
       make<prim::NF4Dequantize>(Shape{4, 64}, DType::bf16, int64_t{64}, int64_t{256}, 0.0f, true),
       make<prim::NF4Dequantize>(Shape{4, 64}, DType::bf16, int64_t{64}, int64_t{256}, 0.5f, false)},
  };
}

struct Twice : autograd::Function {
  std::vector<Tensor> forward(const std::vector<Tensor>& in) override { return {in[0] * 2.0}; }
  std::vector<Tensor> backward(const std::vector<Tensor>& g) override { return {g[0] * 2.0}; }
};

}  // namespace

TEST_CASE("primitives built separately with equal attributes are equal and hash equal", "[primitive]") {
  for (const auto& family : families()) {
    for (const Factory& f : family) {
      PrimitivePtr a = f(), b = f();
      INFO(a->name() << " {" << a->attributes() << "}");
      REQUIRE(a.get() != b.get());
      REQUIRE(a->equals(*b));
      REQUIRE(b->equals(*a));
      REQUIRE(a->equals(*a));
      REQUIRE(a->hash() == b->hash());
      REQUIRE(PrimitiveEqual{}(a, b));
      REQUIRE(PrimitiveHash{}(a) == PrimitiveHash{}(*b));
    }
  }
}

TEST_CASE("every attribute change makes primitives differ", "[primitive]") {
  for (const auto& family : families()) {
    for (size_t i = 0; i < family.size(); ++i) {
      for (size_t j = 0; j < family.size(); ++j) {
        if (i == j) continue;
        PrimitivePtr a = family[i](), b = family[j]();
        INFO(a->name() << " {" << a->attributes() << "} vs " << b->name() << " {" << b->attributes() << "}");
        REQUIRE_FALSE(a->equals(*b));
      }
    }
  }
}

TEST_CASE("primitives of different types differ, even with equal attributes", "[primitive]") {
  std::vector<PrimitivePtr> all;
  for (const auto& family : families()) all.push_back(family[0]());
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = 0; j < all.size(); ++j) {
      if (i != j) REQUIRE_FALSE(all[i]->equals(*all[j]));
    }
  }
  // The same attribute list on two types.
  REQUIRE(prim::RmsNorm(1e-5).attributes() == prim::RmsNormBackward(1e-5).attributes());
  REQUIRE_FALSE(prim::RmsNorm(1e-5).equals(prim::RmsNormBackward(1e-5)));
  REQUIRE_FALSE(prim::ScaledDotProductAttention(true, 0.5).equals(prim::SdpaBackward(true, 0.5)));
  REQUIRE_FALSE(prim::CrossEntropy(-100, Reduction::mean).equals(prim::CrossEntropyBackward(-100, Reduction::mean)));
  REQUIRE_FALSE(prim::SwiGlu().equals(prim::SwiGluBackward()));
  REQUIRE_FALSE(prim::Matmul().equals(prim::Where()));
  REQUIRE_FALSE(prim::View({2, 3}, {6}).equals(prim::Expand({2, 3}, {6})));
}

TEST_CASE("double attributes compare bitwise", "[primitive]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  REQUIRE(prim::RmsNorm(nan).equals(prim::RmsNorm(nan)));
  REQUIRE(prim::RmsNorm(nan).hash() == prim::RmsNorm(nan).hash());
  REQUIRE(prim::Fill({2}, DType::f32, kCPU, nan).equals(prim::Fill({2}, DType::f32, kCPU, nan)));
  REQUIRE_FALSE(prim::Fill({2}, DType::f32, kCPU, 0.0).equals(prim::Fill({2}, DType::f32, kCPU, -0.0)));
  REQUIRE_FALSE(prim::RmsNorm(1e-5).equals(prim::RmsNorm(std::nextafter(1e-5, 1.0))));
}

TEST_CASE("custom Function primitives compare by Function object", "[primitive]") {
  Tensor x = test::random_tensor({3}, DType::f32, 1).set_requires_grad();
  auto fn = std::make_shared<Twice>();
  Tensor a = autograd::apply(fn, {x})[0];
  Tensor b = autograd::apply(fn, {x})[0];
  Tensor c = autograd::apply(std::make_shared<Twice>(), {x})[0];
  const Primitive& pa = *a.grad_fn()->op;
  REQUIRE(a.grad_fn()->op.get() != b.grad_fn()->op.get());
  REQUIRE(pa.equals(*b.grad_fn()->op));
  REQUIRE(pa.hash() == b.grad_fn()->op->hash());
  REQUIRE_FALSE(pa.equals(*c.grad_fn()->op));
}

TEST_CASE("primitives key unordered containers by value", "[primitive]") {
  std::unordered_set<PrimitivePtr, PrimitiveHash, PrimitiveEqual> set;
  size_t distinct = 0;
  for (const auto& family : families()) {
    for (const Factory& f : family) {
      REQUIRE(set.insert(f()).second);
      REQUIRE_FALSE(set.insert(f()).second);  // an equal op from another make_shared
      ++distinct;
    }
  }
  REQUIRE(set.size() == distinct);
  REQUIRE(set.count(std::make_shared<const prim::Dropout>(0.1, 7, 0)) == 1);
  REQUIRE(set.count(std::make_shared<const prim::Dropout>(0.1, 7, 1)) == 0);

  // A cache keyed by op, as CSE would use it: ops of a recomputed expression find the first ones.
  std::unordered_map<PrimitivePtr, int, PrimitiveHash, PrimitiveEqual> cache;
  cache.emplace(std::make_shared<const prim::Unary>(UnaryOp::exp), 1);
  cache.emplace(
      std::make_shared<const prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{1}, false, Shape{2, 3}), 2);
  REQUIRE(cache.at(std::make_shared<const prim::Unary>(UnaryOp::exp)) == 1);
  REQUIRE(cache.at(std::make_shared<const prim::Reduce>(prim::ReduceKind::sum, std::vector<int64_t>{1}, false,
                                                        Shape{2, 3})) == 2);
  REQUIRE(cache.count(std::make_shared<const prim::Unary>(UnaryOp::log)) == 0);
}

TEST_CASE("attributes() prints the typed attributes", "[primitive]") {
  REQUIRE(prim::CrossEntropy(-100, Reduction::mean, false).attributes() ==
          "ignore_index=-100, reduction=mean, check_targets=false");
  REQUIRE(prim::Copy({2, 3}, DType::bf16, kCPU, DType::f32, kCPU).attributes() ==
          "shape=(2, 3), dtype=bf16, device=cpu, src_dtype=f32, src_device=cpu");
  REQUIRE_THAT(prim::Unary(UnaryOp::exp).attributes(), ContainsSubstring("op=exp"));
  REQUIRE(prim::Matmul().attributes() == "alpha=1");
}

// Embedding: the public function, the shape rules and vjps of Embedding and EmbeddingBackward (each
// the other's transpose: gather rows by id, scatter-add them back).
#include "core/ops/indexing.h"

#include <memory>

#include "core/dispatch.h"

namespace kiln {
namespace {

void check_embedding(const Tensor& weight, const Tensor& ids) {
  KILN_CHECK(weight.dim() == 2, "embedding", "weight must be 2-d (V, D), found shape {}", shape_str(weight.shape()));
  KILN_CHECK(is_floating(weight.dtype()), "embedding", "weight must be a float tensor, found {}",
             dtype_name(weight.dtype()));
  KILN_CHECK(is_index(ids.dtype()), "embedding", "ids must be i64 or i32, found {}", dtype_name(ids.dtype()));
}

}  // namespace

namespace prim {

std::vector<TensorMeta> Embedding::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (weight, ids), found {}", in.size());
  check_embedding(in[0], in[1]);
  Shape out = in[1].shape();
  out.push_back(in[0].size(1));
  return {{out, in[0].dtype(), in[0].device()}};
}

std::vector<Tensor> Embedding::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                   const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  return {dispatch1(std::make_shared<const EmbeddingBackward>(in[0].size(0)), {cot[0], in[1]}), Tensor()};
}

std::vector<TensorMeta> EmbeddingBackward::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (grad, ids), found {}", in.size());
  const Tensor& g = in[0];
  KILN_CHECK(is_floating(g.dtype()), name(), "grad must be a float tensor, found {}", dtype_name(g.dtype()));
  KILN_CHECK(is_index(in[1].dtype()), name(), "ids must be i64 or i32, found {}", dtype_name(in[1].dtype()));
  Shape lead = in[1].shape();
  lead.push_back(g.dim() >= 1 ? g.size(-1) : -1);
  KILN_CHECK(g.shape() == lead, name(), "grad must be ids' shape {} plus (D,), found {}", shape_str(in[1].shape()),
             shape_str(g.shape()));
  KILN_CHECK(num_embeddings_ >= 0, name(), "num_embeddings must be >= 0, found {}", num_embeddings_);
  return {{{num_embeddings_, g.size(-1)}, g.dtype(), g.device()}};
}

std::vector<Tensor> EmbeddingBackward::vjp(const std::vector<Tensor>& in, const std::vector<Tensor>&,
                                           const std::vector<Tensor>& cot, const std::vector<bool>& wanted) const {
  if (!wanted[0]) return {Tensor(), Tensor()};
  return {embedding(cot[0], in[1]), Tensor()};
}

}  // namespace prim

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  return dispatch1(std::make_shared<const prim::Embedding>(), {weight, ids});
}

}  // namespace kiln

// Indexing primitives: Embedding (gather rows of a table by id) and EmbeddingBackward (the
// deterministic scatter-add of gradient rows back into the table). CPU kernels in core/cpu/indexing.cpp,
// CUDA in core/cuda/indexing.cu.
#pragma once
#include <vector>

#include "core/ops.h"
#include "core/primitive.h"

namespace kiln::prim {

// weight (V, D) float, ids (...) i64/i32 -> (..., D). An id outside [0, V) is an error (found by the
// kernel, which names the id and V). No gradient for ids.
class Embedding : public Primitive {
 public:
  const char* name() const override { return "embedding"; }
  std::vector<Attr> attrs() const override { return {}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
};

// grad (..., D), ids (...) -> (V, D): row v is the sum of the grad rows whose id is v, added in
// index order (deterministic). Linear in grad, so it has a vjp (embedding of the cotangent).
class EmbeddingBackward : public Primitive {
 public:
  explicit EmbeddingBackward(int64_t num_embeddings) : num_embeddings_(num_embeddings) {}
  const char* name() const override { return "embedding_backward"; }
  std::vector<Attr> attrs() const override { return {{"num_embeddings", num_embeddings_}}; }
  std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const override;
  bool differentiable() const override { return true; }
  std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                          const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const override;
  bool vjp_needs_outputs() const override { return false; }
  int64_t num_embeddings() const { return num_embeddings_; }

 private:
  int64_t num_embeddings_;
};

}  // namespace kiln::prim

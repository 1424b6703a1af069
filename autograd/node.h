// A node of the autograd graph: the primitive that ran, what its vjp needs (detached copies of
// inputs/outputs, with their storage versions), and an edge per input to where its gradient goes.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/primitive.h"

namespace kiln::autograd {

struct Node;

// Where the gradient of one input goes: into another node's output slot, or into a leaf's .grad.
struct Edge {
  std::shared_ptr<Node> node;
  int output_nr = 0;
  std::shared_ptr<TensorImpl> leaf;
  bool active() const { return node != nullptr || leaf != nullptr; }
};

struct Node : std::enable_shared_from_this<Node> {
  PrimitivePtr op;
  // Inputs keep their history (so create_graph can differentiate the vjp); outputs are saved
  // detached to avoid a cycle through this node and get it back as grad_fn when create_graph needs it.
  std::vector<Tensor> saved_inputs;
  std::vector<Tensor> saved_outputs;
  std::vector<uint64_t> saved_versions;
  std::vector<TensorMeta> input_meta;
  std::vector<TensorMeta> output_meta;
  std::vector<Edge> edges;  // one per input
  uint64_t sequence = 0;    // creation order: a node's inputs always have smaller sequence numbers
  bool released = false;    // saved tensors freed by a backward without retain_graph

  Node() = default;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;
  // Frees the chain of nodes behind this one iteratively, so very deep graphs cannot overflow the stack.
  ~Node();
};

// The sequence number the next recorded node gets (nodes recorded from now on have it or more).
uint64_t next_node_sequence();

// Called by dispatch after a differentiable op ran with grad mode on and some input requiring grad.
void record(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs);

}  // namespace kiln::autograd

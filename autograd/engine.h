// Reverse-mode engine: walks the graph behind `outputs` in reverse creation order, calls each
// node's vjp (through dispatch), sums gradients reaching the same place and accumulates into leaves.
#pragma once
#include <vector>

#include "core/tensor.h"

namespace kiln::autograd {

// Accumulates d(sum_i <outputs[i], grad_outputs[i]>)/d(leaf) into every reachable leaf's .grad.
// An undefined grad_output means ones for a one-element output (an error otherwise).
void backward(const std::vector<Tensor>& outputs, const std::vector<Tensor>& grad_outputs = {},
              bool retain_graph = false, bool create_graph = false);

// Returns d(sum_i <outputs[i], grad_outputs[i]>)/d(inputs[j]) without touching any .grad; an input
// the outputs do not depend on gets zeros.
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs = {}, bool retain_graph = false,
                         bool create_graph = false);

}  // namespace kiln::autograd

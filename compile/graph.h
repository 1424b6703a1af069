// The compile IR: a graph of primitives over values (graph inputs or node outputs) with their
// shapes, dtypes and devices. Every node and value remembers where it came from in a trace (its
// origin), so a plan built from one trace runs with the primitives and sizes of a later trace of the
// same structure (compile/signature.h says when two traces have the same structure).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/primitive.h"

namespace kiln::compile {

// What a graph input stands for. Forward graphs read arguments and externals (tensors the traced
// function captured: parameters, constants, rotary tables); backward graphs read the cotangents of
// the forward outputs, forward values the vjps saved (index = forward trace value id) and externals.
enum class InputKind : uint8_t { arg, external, saved, cotangent };
const char* input_kind_name(InputKind k);

struct InputRef {
  InputKind kind = InputKind::arg;
  int index = 0;
};

// Which trace (0 forward, 1 backward) and which node or value of it.
struct Origin {
  int trace = 0;
  int index = -1;
  friend bool operator==(const Origin& a, const Origin& b) { return a.trace == b.trace && a.index == b.index; }
};

struct Value {
  TensorMeta meta;
  int producer = -1;  // node index; -1 for a graph input
  int output_nr = 0;
  InputRef input;     // graph inputs only
  bool requires_grad = false;  // graph inputs only: the traced tensor required grad
  Origin origin;
};

struct Node {
  PrimitivePtr op;
  std::vector<int> inputs;   // value ids
  std::vector<int> outputs;  // value ids
  Origin origin;
};

struct Graph {
  std::vector<Value> values;
  std::vector<Node> nodes;   // topological order
  std::vector<int> inputs;   // value ids of the graph inputs
  std::vector<int> outputs;  // value ids (an input may be an output; ids may repeat)

  int add_input(const TensorMeta& meta, InputRef ref, Origin origin, bool requires_grad = false);
  // Appends a node; its output values get the metas given (origins: the trace's value ids, or -1).
  int add_node(PrimitivePtr op, std::vector<int> inputs, const std::vector<TensorMeta>& outputs, Origin origin,
               const std::vector<Origin>& output_origins = {});
  // For each value, the nodes that read it (in node order).
  std::vector<std::vector<int>> users() const;
  // Values read outside the graph: graph outputs plus `extra` (kept values).
  std::vector<bool> escaping(const std::vector<int>& extra = {}) const;
  // One line per input, node and output: "%3 = add(%1, %2) : f32 (2, 9, 32)".
  std::string str() const;
};

std::string meta_str(const TensorMeta& m);
// Whether a tensor of shape `a` broadcasts (numpy rules) to exactly `target`.
bool broadcasts_to(const Shape& a, const Shape& target);

}  // namespace kiln::compile

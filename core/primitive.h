// Primitive: the record of one op (name, attributes, shape rule, gradient). Backends register a
// kernel per primitive type and device type (core/dispatch.h); the vjp is written with other ops,
// so backward passes through the same dispatch point as forward (MLX's pattern).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace kiln {

struct TensorMeta {
  Shape shape;
  DType dtype;
  Device device;
};

class Primitive {
 public:
  virtual ~Primitive() = default;
  virtual const char* name() const = 0;
  // Attributes as "key=value, ..." for printing, tracing and hashing.
  virtual std::string attributes() const { return {}; }

  // Checks the inputs (throwing kiln::Error "[name] ...") and describes the outputs, which dispatch
  // allocates contiguous before calling the kernel. Not used by views.
  virtual std::vector<TensorMeta> infer(const std::vector<Tensor>& inputs) const = 0;

  // The device whose kernel runs the op: the first input's, or the first output's for ops
  // without inputs. Device moves override it (the CUDA side copies in both directions).
  virtual Device kernel_device(const std::vector<Tensor>& inputs, const std::vector<TensorMeta>& outputs) const {
    return inputs.empty() ? outputs.at(0).device : inputs[0].device();
  }

  // Views alias their input instead of running a kernel.
  virtual bool is_view() const { return false; }
  virtual Tensor make_view(const std::vector<Tensor>& inputs) const;

  // Gradient: cotangents (one per output, zeros where nothing flowed) -> one gradient per input
  // (an undefined Tensor where `wanted[i]` is false or the input has no gradient).
  virtual bool differentiable() const { return false; }
  virtual std::vector<Tensor> vjp(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                  const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted) const;
  // What the vjp reads; autograd saves only that (add saves nothing, exp saves its output).
  virtual bool vjp_needs_inputs() const { return true; }
  virtual bool vjp_needs_outputs() const { return true; }
  // Called when a backward without retain_graph is done with this op's node (custom Functions
  // free the tensors they saved).
  virtual void release_saved() const {}
};

using PrimitivePtr = std::shared_ptr<const Primitive>;

}  // namespace kiln

// Primitive: the record of one op (name, typed attributes, shape rule, gradient). Backends register
// a kernel per primitive type and device type (core/dispatch.h); the vjp is written with other ops,
// so backward passes through the same dispatch point as forward (MLX's pattern).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "core/tensor.h"

namespace kiln {

struct TensorMeta {
  Shape shape;
  DType dtype;
  Device device;
};

// An enum attribute: compared and hashed by value; `label` (a string literal, e.g. "mean") is only
// for printing.
struct EnumAttr {
  int64_t value;
  const char* label;
};

// The identity of a custom object an op calls into (a custom Function): compared by address.
struct ObjectAttr {
  const void* ptr;
};

// One attribute value. Shapes and dim lists are std::vector<int64_t>; doubles compare bitwise (a NaN
// attribute equals itself, 0.0 and -0.0 differ).
using AttrValue = std::variant<int64_t, double, bool, std::string, std::vector<int64_t>, DType, Device, EnumAttr,
                               ObjectAttr>;

struct Attr {
  const char* name;  // a string literal, for printing only
  AttrValue value;
};

bool attr_equal(const AttrValue& a, const AttrValue& b);
size_t attr_hash(const AttrValue& v);
std::string attr_str(const AttrValue& v);

class Primitive {
 public:
  virtual ~Primitive() = default;
  virtual const char* name() const = 0;

  // Every field that makes two ops of this type compute different things (or differ in their vjp),
  // in a fixed order. Identity (equals/hash, used by common-subexpression elimination and compile
  // caches) compares these, never strings.
  virtual std::vector<Attr> attrs() const = 0;
  // Same dynamic type and equal attrs().
  bool equals(const Primitive& other) const;
  // The type's hash combined with the hashes of attrs(); equal primitives hash equal.
  size_t hash() const;
  // attrs() as "key=value, ..." for errors, observers and traces.
  std::string attributes() const;

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
  // vjp, offered the gradient already gathered for some inputs (addends[i] defined: another op's vjp
  // gave input i one first). An op may return addends[i] + its own gradient as grads[i], summed in its
  // kernel (matmul: in the GEMM's epilogue, sparing an add's pass over the tensor), and then undefine
  // addends[i]; the engine adds the gradients of those left as it always does.
  virtual std::vector<Tensor> vjp_accumulating(const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                                               const std::vector<Tensor>& cotangents, const std::vector<bool>& wanted,
                                               std::vector<Tensor>& /*addends*/) const {
    return vjp(inputs, outputs, cotangents, wanted);
  }
  // What the vjp reads; autograd saves only that (add saves nothing, exp saves its output).
  virtual bool vjp_needs_inputs() const { return true; }
  // With vjp_needs_inputs: whether it reads input i; one it does not is saved as an undefined Tensor
  // (matmul's addend: the gradient of a + b @ c needs b and c, never a).
  virtual bool vjp_needs_input(size_t /*i*/) const { return true; }
  virtual bool vjp_needs_outputs() const { return true; }
  // Called when a backward without retain_graph is done with this op's node (custom Functions
  // free the tensors they saved).
  virtual void release_saved() const {}
};

using PrimitivePtr = std::shared_ptr<const Primitive>;

// For unordered containers keyed by primitives (by value, not by pointer).
struct PrimitiveHash {
  size_t operator()(const Primitive& p) const { return p.hash(); }
  size_t operator()(const PrimitivePtr& p) const { return p ? p->hash() : 0; }
};
struct PrimitiveEqual {
  bool operator()(const Primitive& a, const Primitive& b) const { return a.equals(b); }
  bool operator()(const PrimitivePtr& a, const PrimitivePtr& b) const { return a == b || (a && b && a->equals(*b)); }
};

}  // namespace kiln

// The body of one fused group as a list of scalar instructions: what the CPU interpreter runs and
// what the CUDA generator turns into source. Element-level instructions run once per element of the
// group's domain S; row-level ones once per row of S (all dims but the last), fed by reductions over
// the last dim. Each instruction computes in the compute type of its operands (f64 for f64, f32 for
// the other floats, i64 for integers and bool) with core/functors.h, and rounds to its dtype, so an
// element sees the values eager ops would have stored. Fused ops (rms_norm, softmax, swiglu, ...)
// lower to several instructions on compute-type values and round once, as their kernels do.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "compile/graph.h"
#include "core/functors.h"

namespace kiln::compile {

enum class Level : uint8_t { element, row };
enum class Op : uint8_t { load, constant, row_length, unary, binary, where, cast, dropout, reduce };
enum class ReduceOp : uint8_t { sum, mean, max, min };

struct Instr {
  Op op = Op::constant;
  Level level = Level::element;
  DType dtype = DType::f32;  // of the result
  int a = -1, b = -1, c = -1;  // operand instructions
  int slot = -1;               // load: input slot; dropout: random-number slot
  int code = 0;                // UnaryOp, BinaryOp or ReduceOp
  double value = 0.0;          // constant value; dropout probability; reduce: 1 = sum in the result's
                               // type, left to right (rms_norm's kernel), 0 = floats sum in double
  int stage = 0;               // row programs: the pass from which the value is available
};

struct Program {
  struct Input {
    int value;    // graph value read
    Level level;  // element: broadcast against S; row: against S without its last dim
  };
  struct Output {
    int instr;
    int value;    // graph value written (contiguous)
    Level level;
  };
  std::vector<Instr> instrs;       // operands come first
  std::vector<Input> inputs;       // by slot
  std::vector<Output> outputs;
  std::vector<int> rng_nodes;      // random-number slot -> graph node (a Dropout) whose seed/offset it reads
  bool row = false;                // has reductions over the last dim
  int passes = 1;                  // row programs: sweeps over each row
  int domain_value = -1;           // graph value whose shape is S
  // The CUDA executor's kernels for this program, by variant (compile/cuda_exec.cpp).
  mutable std::shared_ptr<void> device_kernels;

  // Per pass, which element-level instructions it evaluates (row programs; pointwise: one pass, all).
  std::vector<std::vector<bool>> pass_masks() const;
  // Readable listing for KILN_COMPILE_LOG.
  std::string str() const;
};

const char* reduce_op_name(ReduceOp r);

// Lowers the nodes of one group (graph order) into a program. `level` gives the level of each value
// the group computes; `escapes` marks values read outside the group, which become outputs. Inputs
// made by a fill become constants.
Program lower_group(const Graph& g, const std::vector<int>& nodes, const std::vector<Level>& level,
                    const std::vector<bool>& escapes, int domain_value, bool row);

}  // namespace kiln::compile

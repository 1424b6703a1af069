// Running one fused group: the CPU interpreter (compile/cpu_exec.cpp) and the CUDA path
// (compile/cuda_exec.cpp: generated source, NVRTC, launch on the current stream).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "compile/program.h"

namespace kiln::compile {

struct GroupArgs {
  Shape domain;                 // S; row programs reduce its last dim
  std::vector<Tensor> inputs;   // by program input slot, any strides, broadcastable as the slot's level says
  std::vector<Tensor> outputs;  // by program output, contiguous, allocated by the caller
  std::vector<std::pair<uint64_t, uint64_t>> rng;  // (seed, offset) per random-number slot
  int64_t static_row_length = -1;  // the last dim of S when the plan fixed it (CUDA specialises on it)
};

// One sweep per element (pointwise) or `passes` sweeps per row, tiles of the row at a time,
// computing with core/functors.h. Rows run in parallel.
void run_group_cpu(const Program& p, const GroupArgs& a);
// Generated CUDA kernel for the program (built once per variant, cached in memory and on disk).
// Throws in builds without CUDA.
void run_group_cuda(const Program& p, const GroupArgs& a);

// The strides of `t` read over `target` (missing and size-1 dims: 0); a row-level input's keepdim
// trailing 1 is dropped first so it reads over the rows.
Shape slot_strides(const Tensor& t, const Shape& target, Level level);

}  // namespace kiln::compile

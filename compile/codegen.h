// CUDA C++ source for one fused group. The generated kernel #includes core/functors.h (and
// core/philox.h for dropout) — the same scalar functors the hand-written kernels use — and nothing
// else; NVRTC compiles it (compile/cubin.h). Its one argument is an array of 64-bit words laid out
// by arg_layout(): sizes, pointers, strides, random seeds. A variant fixes what the source bakes
// in: the domain's rank, per input whether it is read contiguously, as a scalar or through
// strides, 32-bit indexing, the row length when the plan fixed it, and the vector width: with vec > 1
// each thread reads and writes `vec` consecutive elements of every contiguous input and output with
// one aligned (up to 16-byte) access, which the launcher grants only when counts and addresses allow.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "compile/program.h"

namespace kiln::compile {

enum class Access : uint8_t { contiguous, scalar, strided };

struct Variant {
  int rank = 0;                 // of the domain S
  bool index32 = false;         // every offset fits in 32 bits
  // Per input slot. Pointwise programs: how it is read. Row programs (strides always passed): contiguous
  // marks an element-level slot read with vector loads (inner stride 1), anything else reads through strides;
  // empty: all through strides.
  std::vector<Access> access;
  int64_t row_length = -1;      // row programs: the last dim of S when fixed, else -1
  int block = 256;              // threads per block (row programs: a multiple of 32)
  int vec = 1;                  // elements per thread and access (1, 2, 4 or 8)
  std::string key() const;
};

// Positions of the kernel's arguments in its word array.
struct ArgLayout {
  int words = 0;
  int count = 0;                // v[count]: elements (pointwise) or rows (row programs)
  int row_length = -1;          // row programs: v[row_length] = D
  int sizes = -1;               // first of the domain sizes (pointwise: rank; rows: rank - 1)
  std::vector<int> input_ptr, input_strides;  // per input slot (strides -1 when none are passed)
  std::vector<int> output_ptr;
  std::vector<int> rng;         // per random-number slot: seed at rng[k], offset at rng[k] + 1
};
ArgLayout arg_layout(const Program& p, const Variant& v);

// The kernel is extern "C" __global__ void kiln_fused(KilnArgs a).
std::string generate_cuda(const Program& p, const Variant& v);

// 64-bit FNV-1a: stable across runs and machines (disk cache file names).
uint64_t fnv1a(const std::string& s, uint64_t h = 0xcbf29ce484222325ull);

}  // namespace kiln::compile

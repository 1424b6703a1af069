// The structure of a traced graph apart from its sizes, and which sizes a compiled plan fixed.
// Two traces with one structure hash differ only in sizes (shapes and shape-valued attributes, listed
// in a fixed order as "size positions") and in per-call attributes (the Philox seed and offset of
// random ops), so one plan serves both. A position is static (guarded: a call must repeat its value)
// or dynamic (symbolic: any value); a static position seen to change becomes dynamic.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "compile/graph.h"

namespace kiln::compile {

// Attributes that change on every call and are read from each call's trace (seed, offset of random ops).
bool is_runtime_attr(const Primitive& op, const Attr& a);
// Integer attributes that hold sizes (shapes, slice bounds, counts): size positions, not structure.
bool is_size_attr(const Attr& a);

struct Signature {
  uint64_t hash = 0;
  std::vector<int64_t> sizes;   // every size position, in a fixed order
  std::vector<int> value_pos;   // per value: the position of its shape's dim 0
};
Signature signature(const Graph& g, uint64_t seed = 0);

uint64_t hash_combine(uint64_t h, uint64_t v);

struct SizeProfile {
  std::vector<int64_t> values;
  std::vector<bool> dynamic;

  bool matches(const std::vector<int64_t>& sizes) const;
  int widen(const std::vector<int64_t>& sizes);  // marks differing positions dynamic; returns how many
  int num_dynamic() const;
  // The size of dim `dim` of value `v` when static, else -1.
  int64_t static_dim(const Signature& sig, int v, int dim) const;
};

// The first profile of a structure: every position static except those holding a marked dim of an
// argument (`dynamic_dims`: (argument, dim) pairs), found by value: a position whose value is a
// nonzero multiple of a marked size is taken as derived from it (a wrong guess only costs
// specialisation; a miss costs one recompilation when that size changes).
SizeProfile initial_profile(const Signature& sig, const std::vector<std::pair<int, int>>& dynamic_dims,
                            const std::vector<Tensor>& args);

// "(2, s, 32)": a value's shape with dynamic dims shown as s.
std::string profile_shape_str(const Graph& g, const Signature& sig, const SizeProfile& p, int v);

}  // namespace kiln::compile

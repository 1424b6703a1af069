// The CPU reduction every CPU backend uses (local threads, Gloo): sums (bf16 accumulated in f32) and
// NaN-propagating maxima over rank buffers, always in rank order, so results are the same on every
// backend and every run.
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "dist/process_group.h"

namespace kiln::dist {

// For i in [0, count): v = op(srcs[0][i], srcs[1][i], ...) in rank order, then dsts[k][i] = v for
// every k. A dst may alias a src at the same element (in-place all_reduce); dtype is reducible().
void reduce_cpu(DType dtype, ReduceOp op, const std::vector<const void*>& srcs, const std::vector<void*>& dsts,
                int64_t count);

}  // namespace kiln::dist

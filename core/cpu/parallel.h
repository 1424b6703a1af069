// A small fixed thread pool for the CPU backend. parallel_for splits [0, n) into contiguous ranges
// of at least `grain` items; nested calls run inline. KILN_NUM_THREADS overrides the thread count.
#pragma once
#include <cstdint>
#include <functional>

namespace kiln::cpu {

int num_threads();
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace kiln::cpu

// Internal to compile/: KILN_COMPILE_LOG=1 output (graphs, fusion groups, generated source, to
// stderr) and the counters behind compile::stats().
#pragma once
#include <atomic>
#include <cstdint>
#include <string>

namespace kiln::compile {

bool log_enabled();
void log_text(const std::string& title, const std::string& body);

struct Counters {
  std::atomic<int64_t> calls{0}, compilations{0}, recompilations{0}, cache_hits{0}, fused_groups{0}, folded_adds{0},
      fallback_ops{0}, eager_calls{0}, last_forward_kernels{0}, last_forward_groups{0}, last_backward_kernels{0},
      last_backward_groups{0}, last_dynamic_sizes{0}, kernel_compiles{0}, kernel_compile_us{0}, kernel_disk_hits{0},
      group_launches{0};
};
Counters& counters();

}  // namespace kiln::compile

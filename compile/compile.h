// compile/: kiln's trace-based JIT. compile(fn) returns a callable with fn's signature that, on each
// call, traces fn with placeholders (no kernels run; this finds the tensors fn captured and this
// call's sizes and random offsets), looks the graph's structure up in a process-wide cache of
// compiled plans (guards: structure, dtypes, devices, ranks, static sizes), and runs the plan: fused
// groups as generated kernels (CUDA, via NVRTC) or a CPU interpreter, library ops (matmul,
// attention, ...) and unknown ops through dispatch. Differentiable: the backward, traced from the
// vjps, runs as a compiled plan too. A size seen to change (or marked in dynamic_dims) becomes
// symbolic, so one plan serves every sequence length. KILN_COMPILE_LOG=1 prints graphs, groups and
// generated source. docs: compile/README.md.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "compile/trace.h"
#include "core/hook_handle.h"
#include "nn/chunked_loss.h"
#include "train/trainer.h"

namespace kiln::nn {
class Module;
class Llama;
}  // namespace kiln::nn

namespace kiln::compile {

struct CompileOptions {
  std::vector<std::pair<int, int>> dynamic_dims;  // (argument, dim) symbolic from the first call
  bool automatic_dynamic = true;  // a fixed size seen to change becomes symbolic (one recompilation)
  bool fuse = true;               // false: the plan runs every op through dispatch
  std::string name = "fn";        // in logs
};

class CompiledFunction {
 public:
  CompiledFunction() = default;
  // Runs the compiled function (the one given to compile()).
  std::vector<Tensor> operator()(const std::vector<Tensor>& inputs) const;
  // Runs `fn` compiled, for wrappers that receive the function with each call (module forward
  // wrappers); `key` spells the call's non-tensor arguments and is part of the cache key.
  std::vector<Tensor> run(const Fn& fn, const std::vector<Tensor>& inputs, const std::string& key = {}) const;
  const CompileOptions& options() const;

  struct State;
  explicit CompiledFunction(std::shared_ptr<State> s) : s_(std::move(s)) {}

 private:
  std::shared_ptr<State> s_;
};

CompiledFunction compile(Fn fn, CompileOptions options = {});
// Replaces the module's forward with a compiled one (a forward wrapper; remove the handle to undo).
HookHandle compile_module(nn::Module& module, CompileOptions options = {});
// compile_module on every decoder layer (they share plans: one compilation serves all layers).
std::vector<HookHandle> compile_llama_layers(nn::Llama& model, CompileOptions options = {});
// The Trainer's compile seam (TrainerOptions::compile): compiles the decoder layers of the nn::Llama
// it is given (the sequence length symbolic from the start) and returns the loss unchanged (the chunked
// head stays eager: it frees each chunk's logits itself).
train::CompileFn trainer_compile(CompileOptions options = {});
// A loss for nn::chunked_linear_loss compiled: each chunk's (n, V) logits and (n) targets run its ops as
// fused kernels, forward and backward, the rows symbolic so every chunk size shares one plan. A custom
// loss (nn::focal_loss, a lambda) then costs about what the built-in cross-entropy does.
nn::LossFn compile_loss(nn::LossFn loss, CompileOptions options = {});

struct Stats {
  int64_t calls = 0;              // compiled calls (forward)
  int64_t compilations = 0;       // plans built (forward and backward each count)
  int64_t recompilations = 0;     // of those, for a structure already compiled whose guard failed
  int64_t cache_hits = 0;         // forward or backward runs that reused a plan
  int64_t fused_groups = 0;       // groups in the plans built
  int64_t fallback_ops = 0;       // ops run eagerly inside plans because the fuser does not know them
  int64_t folded_adds = 0;        // adds of GEMM outputs done in the GEMM's epilogue, in the plans built
  int64_t eager_calls = 0;        // calls run eagerly: the trace failed or fn wrote in place
  int64_t last_forward_kernels = 0, last_forward_groups = 0;
  int64_t last_backward_kernels = 0, last_backward_groups = 0;
  int64_t last_dynamic_sizes = 0; // symbolic size positions of the last forward plan built
  int64_t group_launches = 0;     // fused groups run, forward and backward (a kernel each on a GPU)
  int64_t kernel_compiles = 0;    // NVRTC compilations
  double kernel_compile_ms = 0;   // their wall time
  int64_t kernel_disk_hits = 0;   // kernels loaded from the disk cache
};
Stats stats();
void reset_stats();
// Forgets every compiled plan and loaded kernel (the disk cache stays).
void clear_caches();

}  // namespace kiln::compile

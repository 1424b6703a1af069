// cuDNN's fused SDPA (bf16/f16, forward and backward) through the cuDNN frontend graph API, with
// graphs cached per shape, layout, dtype, mask and scale; and the switch between it and kiln's own
// flash kernel (KILN_SDPA_BACKEND=auto|cudnn|flash, or set_sdpa_backend) for tests and benchmarks.
#pragma once
#include <cstddef>

#include "core/ops/attention.h"
#include "core/tensor.h"

namespace kiln::cuda {

// auto: cuDNN where it supports the call, else the flash kernel. cudnn: like auto, but a call
// cuDNN refuses is an error. flash: always kiln's flash kernel.
enum class SdpaBackend { automatic, cudnn, flash };
// The process-wide choice; starts from KILN_SDPA_BACKEND (auto when unset).
SdpaBackend sdpa_backend();
void set_sdpa_backend(SdpaBackend backend);
// "cudnn" or "flash": the path the last SDPA forward or backward on this thread took ("" before any).
const char* last_sdpa_path();
void set_last_sdpa_path(const char* path);

// True when cuDNN's SDPA can be asked for this call at all: bf16/f16, non-empty, no causal query
// that sees no key (T > S), unit-stride head dims. cuDNN may still refuse while building the graph.
bool cudnn_sdpa_eligible(const Tensor& q, const Tensor& k, const Tensor& v, bool causal);

// out (B, Hq, T, Dv) any strides (a layout cuDNN cannot write goes through a contiguous buffer) and lse
// (B, Hq, T) f32 contiguous. False when cuDNN refuses the graph
// (remembered, so the build is not retried); errors while running it throw kiln::Error.
bool cudnn_sdpa_forward(const prim::ScaledDotProductAttention& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        Tensor& out, Tensor& lse);

// dq, dk, dv written through their strides (unit head-dim stride, 16-byte aligned rows), from lse_f32
// (B, Hq, T) contiguous f32. cuDNN's backward has no lse
// gradient input: the caller handles a nonzero dlse. False when cuDNN refuses the graph. When the
// workspace cuDNN asks for exceeds sdpa_backward_workspace_limit(), it runs in pieces: one sequence
// per call, then groups of kv heads with their query heads, the fewest calls whose workspace fits.
bool cudnn_sdpa_backward(const prim::SdpaBackward& p, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& out, const Tensor& dout, const Tensor& lse_f32, Tensor& dq, Tensor& dk, Tensor& dv);
// The backward's workspace limit in bytes (default 512 MiB; 0: the smallest groups, whatever the workspace).
void set_sdpa_backward_workspace_limit(size_t bytes);
size_t sdpa_backward_workspace_limit();
// The cuDNN calls the last cuDNN backward on this thread made (its pieces).
int last_sdpa_backward_calls();

}  // namespace kiln::cuda

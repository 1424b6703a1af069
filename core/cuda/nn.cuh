// Launchers of the fused neural-network kernels (core/cuda/nn.cu: embedding, rotary, SwiGLU;
// nn_norm.cu: RMSNorm; nn_loss.cu: cross-entropy), forward and backward. fmt-free and Tensor-free: raw device
// pointers, element strides, Strided<N> row descriptors and a cudaStream_t passed as void*.
// Float dtypes only (bf16/f16/f32 compute in f32, f64 in f64); ids/targets are i64 or i32.
// Kernels that validate indices record the smallest bad flat position with atomicMin into `err`
// (a device u64 preset to kNoError); the host reads it back and raises the error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

constexpr unsigned long long kNoError = 0x7f7f7f7f7f7f7f7full;  // the byte pattern 0x7f

// ---- embedding
// weight (V, D) with strides (ws0, ws1), ids over `id_pos` (n positions, any strides) -> out (n, D).
cudaError_t launch_embedding(DType dt, DType id_dt, const void* weight, int64_t v, int64_t d, int64_t ws0,
                             int64_t ws1, const void* ids, const Strided<1>& id_pos, int64_t n, void* out,
                             unsigned long long* err, void* stream);

// Bytes of scratch launch_embedding_backward needs for n ids.
size_t embedding_backward_workspace(int64_t n);
// grad rows at `grad_rows` (n rows, column stride gs) summed per id into out (V, D), zero elsewhere.
// Deterministic: a stable radix sort of (id, position) groups each id's rows in index order, then
// one block per group adds them in that order in f32 (f64 for f64).
cudaError_t launch_embedding_backward(DType dt, DType id_dt, const void* grad, const Strided<1>& grad_rows,
                                      int64_t gs, const void* ids, const Strided<1>& id_pos, int64_t n, int64_t v,
                                      int64_t d, void* out, void* workspace, size_t workspace_bytes,
                                      unsigned long long* err, void* stream);

// ---- rms_norm
// x rows at `rows` (r rows of d, column stride xs), weight (d) with stride ws -> out (r, d).
cudaError_t launch_rms_norm(DType dt, const void* x, const Strided<1>& rows, int64_t xs, const void* w, int64_t ws,
                            int64_t r, int64_t d, double eps, void* out, void* stream);

// Bytes of scratch (f32/f64 per-block partial sums of dw) for r rows of d.
size_t rms_norm_backward_workspace(DType dt, int64_t r, int64_t d);
// rows: operand 0 = x, 1 = g; -> dx (r, d), dw (d). dw is reduced deterministically: fixed chunks of
// rows per block write partial sums, a second kernel adds the partials in chunk order.
cudaError_t launch_rms_norm_backward(DType dt, const void* x, const void* g, const Strided<2>& rows, int64_t xs,
                                     int64_t gs, const void* w, int64_t ws, int64_t r, int64_t d, double eps,
                                     void* dx, void* dw, void* workspace, void* stream);

// ---- rotary_embedding
// r rows of x (d = 2h, column stride xs); rows operand 0 = x, 1 = cos, 2 = sin (tables have h
// columns with strides cs, ss). table_dt is x's dtype or f32. -> out (r, 2h).
cudaError_t launch_rotary(DType dt, DType table_dt, const void* x, const void* cos, const void* sin,
                          const Strided<3>& rows, int64_t xs, int64_t cs, int64_t ss, int64_t r, int64_t h, void* out,
                          void* stream);

// ---- cross_entropy (reduction: 0 none, 1 sum, 2 mean)
// Bytes of scratch launch_cross_entropy needs for n rows.
size_t cross_entropy_workspace(DType dt, int64_t n);
// logits (n, v) with strides (s0, s1), targets (n) with stride ts -> out (n) or 0-d in logits' dtype.
cudaError_t launch_cross_entropy(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v, int64_t s0,
                                 int64_t s1, const void* targets, int64_t ts, int64_t ignore_index, int reduction,
                                 void* out, void* workspace, unsigned long long* err, void* stream);
// grad of the loss in the compute type (f32, f64 for f64 logits): (n) with stride gstride, or 0-d.
// -> dlogits (n, v) contiguous. workspace: cross_entropy_workspace bytes.
cudaError_t launch_cross_entropy_backward(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v,
                                          int64_t s0, int64_t s1, const void* targets, int64_t ts, int64_t ignore_index,
                                          int reduction, const void* grad, int64_t gstride, void* out, void* workspace,
                                          unsigned long long* err, void* stream);

// ---- swiglu: out = silu(gate) * up over n elements. `st` is null when every operand is contiguous,
// otherwise operand 0 = out, 1 = gate, 2 = up.
cudaError_t launch_swiglu(DType dt, const void* gate, const void* up, void* out, int64_t n, const Strided<3>* st,
                          void* stream);
// dgate, dup from (gate, up, g); `st` null when contiguous, else 0 = dgate, 1 = dup, 2 = gate, 3 = up, 4 = g.
cudaError_t launch_swiglu_backward(DType dt, const void* gate, const void* up, const void* g, void* dgate, void* dup,
                                   int64_t n, const Strided<5>* st, void* stream);

}  // namespace kiln::cuda

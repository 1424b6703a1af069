// Launchers of the cross-entropy kernels (core/cuda/loss.cu), forward and backward. fmt-free and
// Tensor-free: raw device pointers, element strides and a cudaStream_t passed as void*. Float logits
// (bf16/f16/f32 compute in f32, f64 in f64); targets i64 or i32. When `err` is non-null the kernels
// validate targets: the smallest bad row is recorded with atomicMin into `err`, a device u64 preset to
// kNoError (core/cuda/index_check.h); the host reads it back and raises the error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

// `reduction`: 0 none, 1 sum, 2 mean.

// Bytes of scratch launch_cross_entropy needs for n rows.
size_t cross_entropy_workspace(DType dt, int64_t n);
// logits (n, v) with strides (s0, s1), targets (n) with stride ts -> out (n) or 0-d in logits' dtype.
cudaError_t launch_cross_entropy(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v, int64_t s0,
                                 int64_t s1, const void* targets, int64_t ts, int64_t ignore_index, int reduction,
                                 void* out, void* workspace, unsigned long long* err, void* stream);
// grad of the loss in the compute type (f32, f64 for f64 logits): (n) with stride gstride, or 0-d.
// -> dlogits (n, v) contiguous. workspace: one compute-type element (the count of non-ignored rows,
// written and read when reduction is mean).
cudaError_t launch_cross_entropy_backward(DType dt, DType target_dt, const void* logits, int64_t n, int64_t v,
                                          int64_t s0, int64_t s1, const void* targets, int64_t ts, int64_t ignore_index,
                                          int reduction, const void* grad, int64_t gstride, void* out, void* workspace,
                                          unsigned long long* err, void* stream);

// Loss and gradient in one pass, in place: logits (n, v) contiguous are overwritten with scale *
// d(loss)/d(logits); loss (n) in the compute type. targets already validated (no check); scale: one
// device compute-type value.
cudaError_t launch_cross_entropy_loss_grad(DType dt, DType target_dt, void* logits, int64_t n, int64_t v,
                                           const void* targets, int64_t ts, int64_t ignore_index, const void* scale,
                                           double label_smoothing, double z_loss_weight, void* loss, void* stream);

}  // namespace kiln::cuda

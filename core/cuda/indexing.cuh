// Launchers of the embedding kernels (core/cuda/indexing.cu), forward and backward. fmt-free and
// Tensor-free: raw device pointers, element strides, Strided<1> position descriptors and a cudaStream_t
// passed as void*. Float tables; ids are i64 or i32. The kernels validate ids: the smallest bad flat
// position is recorded with atomicMin into `err`, a device u64 preset to kNoError
// (core/cuda/index_check.h), which the host reads back to raise the error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/strided.cuh"
#include "core/dtype.h"

namespace kiln::cuda {

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

}  // namespace kiln::cuda

// Host side of the cross-entropy kernels (core/cuda/loss.cu): allocates scratch from kiln's allocator,
// launches on the device's current stream and registers the kernels. Targets are checked by the kernels
// (one stream synchronisation per call to read the flag) unless the primitive says check_targets =
// false: cross_entropy_unchecked, and every backward (its forward checked the same targets).
#include <cuda_runtime_api.h>

#include <optional>

#include "core/cuda/check.h"
#include "core/cuda/index_check.h"
#include "core/cuda/loss.cuh"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/loss.h"
#include "core/registry.h"

namespace kiln::cuda {
namespace {

int reduction_code(Reduction r) { return r == Reduction::none ? 0 : (r == Reduction::sum ? 1 : 2); }

void check_targets(const IndexCheck& check, const Tensor& targets, int64_t v, int64_t ignore, const char* op) {
  const int64_t bad = check.first_bad();
  KILN_CHECK(bad < 0, op, "target {} at row {} is out of range [0, {}) and is not ignore_index ({})",
             index_at(targets, bad, op), bad, v, ignore);
}

void cross_entropy_kernel(const prim::CrossEntropy& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const char* op = "cross_entropy";
  const Tensor &logits = in[0], &targets = in[1];  // (N, V), (N)
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0 && p.reduction() == Reduction::none) return;
  DeviceGuard guard(logits.device().index);
  void* stream = stream_of(out[0]);
  const int64_t bytes = static_cast<int64_t>(cross_entropy_workspace(logits.dtype(), n));
  Tensor scratch = empty({bytes}, DType::u8, logits.device());  // (N + 1) per-row losses in the compute type
  std::optional<IndexCheck> check;
  if (p.check_targets()) check.emplace(logits, stream, op);
  KILN_CUDA_CHECK(launch_cross_entropy(logits.dtype(), targets.dtype(), logits.raw_data(), n, v, logits.strides()[0],
                                       logits.strides()[1], targets.raw_data(), targets.strides()[0], p.ignore_index(),
                                       reduction_code(p.reduction()), out[0].raw_data(), scratch.raw_data(),
                                       check ? check->ptr() : nullptr, stream),
                  op);
  if (check && n > 0) check_targets(*check, targets, v, p.ignore_index(), op);
}

void cross_entropy_backward_kernel(const prim::CrossEntropyBackward& p, const std::vector<Tensor>& in,
                                   std::vector<Tensor>& out) {
  const char* op = "cross_entropy_backward";
  const Tensor &logits = in[0], &targets = in[1];  // (N, V), (N)
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0 || v == 0) return;
  DeviceGuard guard(logits.device().index);
  void* stream = stream_of(out[0]);
  const DType ct = compute_dtype(logits.dtype());
  const Tensor g = in[2].dtype() == ct ? in[2] : cast(in[2], ct);  // (N) or 0-d
  const int64_t gstride = g.dim() == 1 ? g.strides()[0] : 0;
  Tensor count = empty({1}, ct, logits.device());  // non-ignored rows, for the mean
  std::optional<IndexCheck> check;
  if (p.check_targets()) check.emplace(logits, stream, op);
  KILN_CUDA_CHECK(launch_cross_entropy_backward(logits.dtype(), targets.dtype(), logits.raw_data(), n, v,
                                                logits.strides()[0], logits.strides()[1], targets.raw_data(),
                                                targets.strides()[0], p.ignore_index(), reduction_code(p.reduction()),
                                                g.raw_data(), gstride, out[0].raw_data(), count.raw_data(),
                                                check ? check->ptr() : nullptr, stream),
                  op);
  if (check) check_targets(*check, targets, v, p.ignore_index(), op);
}

// out[1] is the logits themselves (cross_entropy_loss_grad_) or a fresh buffer: copied first then.
void cross_entropy_loss_grad_kernel(const prim::CrossEntropyLossGrad& p, const std::vector<Tensor>& in,
                                    std::vector<Tensor>& out) {
  const char* op = "cross_entropy_loss_grad";
  const Tensor &logits = in[0], &targets = in[1];  // (N, V), (N)
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n == 0) return;
  DeviceGuard guard(logits.device().index);
  void* stream = stream_of(out[0]);
  if (out[1].raw_data() != logits.raw_data() || !logits.is_contiguous()) copy_(out[1], logits);
  const DType ct = compute_dtype(logits.dtype());
  const Tensor scale = in[2].dtype() == ct ? in[2] : cast(in[2], ct);  // 0-d
  KILN_CUDA_CHECK(launch_cross_entropy_loss_grad(logits.dtype(), targets.dtype(), out[1].raw_data(), n, v,
                                                 targets.raw_data(), targets.strides()[0], p.ignore_index(),
                                                 scale.raw_data(), p.label_smoothing(), p.z_loss_weight(),
                                                 out[0].raw_data(), stream),
                  op);
}

}  // namespace

KILN_REGISTER(cuda_loss_kernels) {
  register_kernel<prim::CrossEntropy>(DeviceType::cuda, &cross_entropy_kernel);
  register_kernel<prim::CrossEntropyBackward>(DeviceType::cuda, &cross_entropy_backward_kernel);
  register_kernel<prim::CrossEntropyLossGrad>(DeviceType::cuda, &cross_entropy_loss_grad_kernel);
}

}  // namespace kiln::cuda

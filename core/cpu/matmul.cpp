// CPU kernel of prim::Matmul: walks the broadcast batch and hands each (M, K) @ (K, N) pair to
// cpu::gemm as strided views (no copies of transposed or sliced operands). A batch against one
// shared B folds into a single taller GEMM; bf16/f16 accumulate in an f32 buffer rounded once. The
// product is scaled by the primitive's alpha, and an addend (third input) joins it, before that rounding.
#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "core/cpu/gemm.h"
#include "core/cpu/parallel.h"
#include "core/registry.h"
#include "core/dispatch.h"
#include "core/layout.h"
#include "core/ops.h"
#include "core/ops/matmul.h"

namespace kiln::cpu {
namespace {

// Per-batch-entry work (multiply-adds) below which the batch, not the GEMM, is run in parallel.
constexpr int64_t kSmallGemm = int64_t{1} << 21;

// When every row of A over the whole batch is evenly spaced (the batch dims and M merge into one
// dim), the distance between consecutive rows; A broadcast along a batch dim does not merge.
std::optional<int64_t> merged_row_stride(const Shape& batch, const Shape& a_batch_strides, int64_t m, int64_t rs) {
  int64_t stride = rs;
  int64_t extent = m;  // rows covered so far by the merged dim
  bool started = m > 1;
  for (size_t d = batch.size(); d-- > 0;) {
    if (batch[d] == 1) continue;
    if (a_batch_strides[d] == 0) return std::nullopt;
    if (!started) {
      stride = a_batch_strides[d];
      extent = batch[d];
      started = true;
      continue;
    }
    if (a_batch_strides[d] != stride * extent) return std::nullopt;
    extent *= batch[d];
  }
  return stride;
}

// Element offset of every batch entry (row-major over `batch`) under the given batch strides.
std::vector<int64_t> batch_offsets(const Shape& batch, const Shape& strides) {
  std::vector<int64_t> out(static_cast<size_t>(numel(batch)), 0);
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t rem = static_cast<int64_t>(i), off = 0;
    for (size_t d = batch.size(); d-- > 0;) {
      off += (rem % batch[d]) * strides[d];
      rem /= batch[d];
    }
    out[i] = off;
  }
  return out;
}

template <class T>
void matmul_typed(const Tensor& a, const Tensor& b, const Tensor* addend, double alpha, Tensor& out) {
  using C = compute_t<T>;
  const Shape& os = out.shape();
  const int64_t m = os[os.size() - 2], n = os[os.size() - 1], k = a.shape().back();
  if (m == 0 || n == 0) return;
  const Shape batch(os.begin(), os.end() - 2);
  const int64_t nbatch = numel(batch);
  if (nbatch == 0) return;

  const int64_t a_rs = a.strides()[a.strides().size() - 2], a_cs = a.strides().back();
  const int64_t b_rs = b.strides()[b.strides().size() - 2], b_cs = b.strides().back();
  const T* a_data = a.numel() > 0 ? a.data_ptr<T>() : nullptr;
  const T* b_data = b.numel() > 0 ? b.data_ptr<T>() : nullptr;
  const Shape a_bst = batch_strides(a, batch);
  const Shape b_bst = batch_strides(b, batch);

  // The addend, contiguous, read before C is written (out may be the addend itself: out += a @ b).
  Tensor add;
  if (addend != nullptr) {
    add = addend->raw_data() == out.raw_data() ? addend->detach().clone()
          : addend->is_contiguous()            ? *addend
                                               : contiguous(addend->detach());
  }
  // C (batch..., M, N) contiguous: the output itself, or an f32 buffer for bf16/f16.
  std::vector<C> scratch;
  C* c = nullptr;
  if constexpr (std::is_same_v<T, C>) {
    c = out.data_ptr<T>();
  } else {
    scratch.resize(static_cast<size_t>(nbatch * m * n));
    c = scratch.data();
  }

  bool b_shared = true;
  for (size_t d = 0; d < batch.size(); ++d) b_shared = b_shared && (batch[d] == 1 || b_bst[d] == 0);
  std::optional<int64_t> rows_stride = b_shared ? merged_row_stride(batch, a_bst, m, a_rs) : std::nullopt;
  if (nbatch == 1 || rows_stride || k == 0) {
    // one GEMM: (batch * M, K) @ (K, N) -> (batch * M, N); K == 0 only writes zeros
    const int64_t rs = nbatch == 1 ? a_rs : rows_stride.value_or(a_rs);
    gemm<T>(nbatch * m, n, k, MatrixRef<T>{a_data, rs, a_cs}, MatrixRef<T>{b_data, b_rs, b_cs}, c, n);
  } else {
    const std::vector<int64_t> a_off = batch_offsets(batch, a_bst);
    const std::vector<int64_t> b_off = batch_offsets(batch, b_bst);
    auto one = [&](int64_t i) {
      const size_t s = static_cast<size_t>(i);
      gemm<T>(m, n, k, MatrixRef<T>{a_data + a_off[s], a_rs, a_cs}, MatrixRef<T>{b_data + b_off[s], b_rs, b_cs},
              c + i * m * n, n);
    };
    const int64_t work = m * n * std::max<int64_t>(k, 1);
    if (work < kSmallGemm) {
      // many small products: one per task (each GEMM then runs on its task's thread)
      parallel_for(nbatch, std::max<int64_t>(1, kSmallGemm / 8 / work), [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) one(i);
      });
    } else {
      for (int64_t i = 0; i < nbatch; ++i) one(i);
    }
  }

  if (alpha != 1.0) {
    const C s = static_cast<C>(alpha);
    parallel_for(nbatch * m * n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) c[i] *= s;
    });
  }
  if (addend != nullptr) {
    const T* d = add.data_ptr<T>();  // (batch..., M, N)
    parallel_for(nbatch * m * n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) c[i] += static_cast<C>(d[i]);
    });
  }
  if constexpr (!std::is_same_v<T, C>) {
    T* o = out.data_ptr<T>();  // (batch..., M, N)
    parallel_for(nbatch * m * n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = T(c[i]);
    });
  }
}

void matmul_kernel(const prim::Matmul& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  visit_dtype(in[0].dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, bf16> ||
                  std::is_same_v<T, f16>) {
      matmul_typed<T>(in[0], in[1], in.size() > 2 ? &in[2] : nullptr, p.alpha(), out[0]);
    } else {
      KILN_FAIL("matmul", "expected floating-point operands (f64, f32, bf16, f16), found {}",
                dtype_name(in[0].dtype()));
    }
  });
}

}  // namespace

KILN_REGISTER(cpu_matmul_kernels) { register_kernel<prim::Matmul>(DeviceType::cpu, &matmul_kernel); }

}  // namespace kiln::cpu

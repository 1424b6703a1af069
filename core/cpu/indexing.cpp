// CPU kernels of embedding (a row gather by id) and its backward (a deterministic scatter-add: rows
// grouped by id with a counting sort, each group summed in index order). Ids are range-checked.
#include <algorithm>

#include "core/cpu/fused_common.h"
#include "core/cpu/parallel.h"
#include "core/dispatch.h"
#include "core/ops/indexing.h"
#include "core/registry.h"

namespace kiln::cpu {
namespace {

using fused::axpy;
using fused::gather;
using fused::gather_index;
using fused::grain_for;
using fused::store;
using fused::visit_float;

void check_ids(const std::vector<int64_t>& ids, int64_t v, const char* op) {
  for (size_t i = 0; i < ids.size(); ++i) {
    KILN_CHECK(ids[i] >= 0 && ids[i] < v, op, "id {} (at flat position {}) is out of range for V = {} embeddings",
               ids[i], i, v);
  }
}

void embedding_kernel(const prim::Embedding&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& w = in[0];  // (V, D)
  const int64_t v = w.size(0), d = w.size(1);
  const std::vector<int64_t> ids = gather_index(in[1], "embedding");  // (N)
  check_ids(ids, v, "embedding");
  visit_float(w.dtype(), "embedding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* wp = static_cast<const T*>(w.raw_data());
    const int64_t s0 = w.strides()[0], s1 = w.strides()[1];
    T* op = out[0].data_ptr<T>();  // (N, D)
    parallel_for(static_cast<int64_t>(ids.size()), grain_for(d), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const T* src = wp + ids[static_cast<size_t>(n)] * s0;
        T* dst = op + n * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = src[j * s1];
      }
    });
  });
}

void embedding_backward_kernel(const prim::EmbeddingBackward& p, const std::vector<Tensor>& in,
                               std::vector<Tensor>& out) {
  const Tensor& g = in[0];  // (..., D)
  const int64_t v = p.num_embeddings(), d = g.size(-1);
  const std::vector<int64_t> ids = gather_index(in[1], "embedding_backward");  // (N)
  check_ids(ids, v, "embedding_backward");
  const int64_t n = static_cast<int64_t>(ids.size());
  // rows grouped by id, each group in index order (a counting sort): the sum is deterministic
  std::vector<int64_t> start(static_cast<size_t>(v) + 1, 0);  // (V + 1)
  for (int64_t id : ids) ++start[static_cast<size_t>(id) + 1];
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  std::vector<int64_t> next(start.begin(), start.end() - 1);  // (V)
  std::vector<int64_t> order(static_cast<size_t>(n));         // (N) row indices sorted by id
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(next[static_cast<size_t>(ids[static_cast<size_t>(i)])]++)] = i;
  visit_float(g.dtype(), "embedding_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const std::vector<C> gc = gather<C>(g, "embedding_backward");  // (N, D)
    T* op = out[0].data_ptr<T>();                                    // (V, D)
    parallel_for(v, grain_for(d), [&](int64_t b, int64_t e) {
      std::vector<C> acc(static_cast<size_t>(d));  // (D)
      for (int64_t row = b; row < e; ++row) {
        std::fill(acc.begin(), acc.end(), C(0));
        for (int64_t k = start[static_cast<size_t>(row)]; k < start[static_cast<size_t>(row) + 1]; ++k) {
          axpy(acc.data(), C(1), gc.data() + order[static_cast<size_t>(k)] * d, d);
        }
        for (int64_t j = 0; j < d; ++j) op[row * d + j] = store<T>(acc[static_cast<size_t>(j)]);
      }
    });
  });
}

}  // namespace

KILN_REGISTER(cpu_indexing_kernels) {
  register_kernel<prim::Embedding>(DeviceType::cpu, &embedding_kernel);
  register_kernel<prim::EmbeddingBackward>(DeviceType::cpu, &embedding_backward_kernel);
}

}  // namespace kiln::cpu

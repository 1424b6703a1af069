// CUDA kernel of prim::Matmul through cuBLASLt, and the TF32 switch. Operands whose last two dims are row-major or a transpose of row-major go in as they are (op flags and
// leading dims); batches use strided-batch layouts, looping only over batch dims that do not merge.
// Plans (descriptors + heuristic algorithm) are cached per thread by shape/dtype/layout/alignment.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "core/cuda/check.h"
#include "core/cuda/matmul.h"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/layout.h"
#include "core/ops.h"
#include "core/ops/matmul.h"

namespace kiln::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;
std::atomic<bool> g_allow_tf32{false};
std::atomic<bool> g_tune{[] {
  const char* e = std::getenv("KILN_GEMM_TUNE");
  return e != nullptr && std::strcmp(e, "1") == 0;
}()};
constexpr int kTuneCandidates = 8;
constexpr int kTuneRuns = 3;

#define KILN_CUBLAS_CHECK(call, op)                                                                     \
  do {                                                                                                  \
    cublasStatus_t kiln_st_ = (call);                                                                   \
    if (kiln_st_ != CUBLAS_STATUS_SUCCESS) {                                                            \
      throw ::kiln::Error(fmt::format("[{}] {} failed: {}", op, #call, cublasLtGetStatusString(kiln_st_))); \
    }                                                                                                   \
  } while (0)

// One cuBLASLt handle per device, created on first use and kept for the process.
cublasLtHandle_t handle_for(int device) {
  static std::mutex mu;
  static auto* handles = new std::map<int, cublasLtHandle_t>();  // never freed: used until exit
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cublasLtHandle_t h = nullptr;
  KILN_CUBLAS_CHECK(cublasLtCreate(&h), "matmul");
  handles->emplace(device, h);
  return h;
}

// A 32 MiB workspace per (device, stream) from kiln's allocator, kept for the process (two streams
// must not share one: their GEMMs could run at the same time). Host threads that share a stream (the
// local backend's ranks on the default stream) also share its workspace: one cublasLtMatmul may
// enqueue several kernels that pass data through it (split-K), so GEMMs are enqueued under the
// workspace's lock, each call's kernels back to back in the stream.
struct Workspace {
  Tensor buffer;  // (kWorkspaceBytes) u8
  std::mutex enqueue;
};
Workspace& workspace_for(int device, void* stream) {
  static std::mutex mu;
  static auto* spaces = new std::map<std::pair<int, void*>, Workspace>();  // never freed
  std::lock_guard<std::mutex> lock(mu);
  Workspace& w = (*spaces)[std::make_pair(device, stream)];
  if (!w.buffer.defined()) w.buffer = empty({static_cast<int64_t>(kWorkspaceBytes)}, DType::u8, Device(DeviceType::cuda, device));
  return w;
}

struct TypeInfo {
  cudaDataType_t data;
  cudaDataType_t scale;
  cublasComputeType_t compute;
};

TypeInfo type_info(DType d) {
  switch (d) {
    case DType::bf16: return {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    case DType::f16: return {CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F};
    case DType::f32:
      return {CUDA_R_32F, CUDA_R_32F, g_allow_tf32.load() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F};
    case DType::f64: return {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F};
    default: break;
  }
  KILN_FAIL("matmul", "expected floating-point operands (f64, f32, bf16, f16), found {}", dtype_name(d));
}

// Largest power of two <= 256 dividing every value (bytes).
uint32_t alignment_of(std::initializer_list<uint64_t> values) {
  uint32_t a = 256;
  for (uint64_t v : values) {
    while (a > 1 && v % a != 0) a /= 2;
  }
  return a;
}

// One GEMM problem in cuBLASLt's column-major terms: D (m, n) = op(A) (m, k) @ op(B) (k, n).
struct GemmKey {  // trivial: zeroed with memset (padding included) before filling
  int device;
  cudaDataType_t data;
  cublasComputeType_t compute;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc;
  int64_t batch, stride_a, stride_b, stride_c;
  uint32_t align_a, align_b, align_c;

  friend bool operator==(const GemmKey& x, const GemmKey& y) { return std::memcmp(&x, &y, sizeof(GemmKey)) == 0; }
};

struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const {
    // FNV-1a over the bytes (the struct is zero-initialised, padding included, before filling)
    const auto* p = reinterpret_cast<const unsigned char*>(&k);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(GemmKey); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// Descriptors and the heuristic's algorithm for one GemmKey.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::vector<cublasLtMatmulAlgo_t> candidates;  // to time, when tuning (then emptied)
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

cublasLtMatrixLayout_t make_layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                                   int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  KILN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, t, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
                    "matmul");
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    KILN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
                      "matmul");
    KILN_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
        "matmul");
  }
  return l;
}

std::unique_ptr<Plan> build_plan(const GemmKey& k, const TypeInfo& ti, cublasLtHandle_t handle) {
  auto plan = std::make_unique<Plan>();
  KILN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, k.compute, ti.scale), "matmul");
  const cublasOperation_t ta = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  KILN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "matmul");
  KILN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "matmul");
  plan->a = k.trans_a ? make_layout(k.data, k.k, k.m, k.lda, k.batch, k.stride_a)
                      : make_layout(k.data, k.m, k.k, k.lda, k.batch, k.stride_a);
  plan->b = k.trans_b ? make_layout(k.data, k.n, k.k, k.ldb, k.batch, k.stride_b)
                      : make_layout(k.data, k.k, k.n, k.ldb, k.batch, k.stride_b);
  plan->c = make_layout(k.data, k.m, k.n, k.ldc, k.batch, k.stride_c);

  cublasLtMatmulPreference_t pref = nullptr;
  KILN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref), "matmul");
  std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)> guard(
      pref, &cublasLtMatmulPreferenceDestroy);
  const uint64_t ws = kWorkspaceBytes;
  KILN_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "matmul");
  const std::array<std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t>, 4> aligns{{
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c},
  }};
  for (const auto& [attr, value] : aligns) {
    KILN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)), "matmul");
  }
  std::array<cublasLtMatmulHeuristicResult_t, kTuneCandidates> results{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                                           g_tune.load() ? kTuneCandidates : 1, results.data(), &found);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && found == 0)) return nullptr;
  KILN_CUBLAS_CHECK(st, "matmul");
  plan->algo = results[0].algo;
  if (found > 1)
    for (int i = 0; i < found; ++i) plan->candidates.push_back(results[static_cast<size_t>(i)].algo);
  return plan;
}

// The cached plan of `key` on this thread (cuBLASLt descriptors are not shared between threads);
// null when cuBLASLt has no algorithm for it (remembered too).
Plan* plan_for(const GemmKey& key, const TypeInfo& ti, cublasLtHandle_t handle) {
  thread_local std::unordered_map<GemmKey, std::unique_ptr<Plan>, GemmKeyHash> cache;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  if (cache.size() >= 4096) cache.clear();  // bound the cache under endlessly changing shapes
  return cache.emplace(key, build_plan(key, ti, handle)).first->second.get();
}

// The last two dims of an operand as cuBLASLt sees them: row-major (R, C) with row stride ld, or its
// transpose (column-major, column stride ld). Dims of size 1 accept any stride.
struct MatrixView {
  bool ok = false;
  bool col_major = false;
  int64_t ld = 0;
};

MatrixView matrix_view(int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if ((cols == 1 || cs == 1) && (rows == 1 || rs >= cols)) return {true, false, rows == 1 ? std::max<int64_t>(cols, 1) : rs};
  if ((rows == 1 || rs == 1) && (cols == 1 || cs >= rows)) return {true, true, cols == 1 ? std::max<int64_t>(rows, 1) : cs};
  return {};
}

// An operand ready for cuBLASLt: the tensor (possibly made contiguous) and its matrix view.
struct Operand {
  Tensor t;
  MatrixView view;
};

Operand prepare(const Tensor& x) {
  const int64_t r = x.size(-2), c = x.size(-1);
  MatrixView v = matrix_view(r, c, x.strides()[x.strides().size() - 2], x.strides().back());
  if (v.ok) return {x, v};
  Tensor cx = contiguous(x.detach());  // neither layout: one copy (no autograd inside a kernel)
  return {cx, matrix_view(r, c, c, 1)};
}

// D (batch..., M, N) = alpha A (batch..., M, K) @ B (batch..., K, N) (+ C, a contiguous tensor of D's
// shape, with beta = 1) into a contiguous `out`. False (nothing launched) when cuBLASLt has no algorithm for
// these layouts and alignments.
bool try_gemm(const Tensor& a_in, const Tensor& b_in, const Tensor* addend, double alpha_value, Tensor& out, const char* op) {
  const Shape& os = out.shape();
  const int64_t m = os[os.size() - 2], n = os.back(), k = a_in.shape().back();
  if (out.numel() == 0) return true;
  const int device = out.device().index;
  DeviceGuard guard(device);
  void* stream = stream_of(out);
  const size_t es = itemsize(out.dtype());
  if (k == 0) {  // an empty sum: zeros (or the addend)
    if (addend != nullptr) {
      copy_(out, *addend);
      return true;
    }
    KILN_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes(), static_cast<cudaStream_t>(stream)), op);
    return true;
  }
  const Operand a = prepare(a_in), b = prepare(b_in);
  const int64_t a_rs = a.t.strides()[a.t.strides().size() - 2];

  // Batch dims merged jointly for (out, a, b); all-size-1 batches merge to one dim of 1.
  Shape batch(os.begin(), os.end() - 2);
  std::vector<Shape> bst{contiguous_strides(batch), batch_strides(a.t, batch), batch_strides(b.t, batch)};
  for (int64_t& v : bst[0]) v *= m * n;
  if (batch.empty()) {
    batch = {1};
    bst = {{0}, {0}, {0}};
  }
  coalesce_dims(batch, bst);

  int64_t rows = m;  // M, or batch * M when the batch folds into the rows of one GEMM
  int64_t a_ld = a.view.ld;
  const bool one_batch_dim = batch.size() == 1;
  if (one_batch_dim && batch[0] > 1 && bst[2][0] == 0 && !a.view.col_major) {
    const int64_t sa = bst[1][0];
    if (m == 1 && sa >= k) {
      rows = batch[0];
      a_ld = sa;
    } else if (m > 1 && sa == m * a_rs) {
      rows = batch[0] * m;
    }
  }
  const bool folded = rows != m;
  const int64_t inner = folded ? 1 : batch.back();  // strided-batch count per call

  const TypeInfo ti = type_info(out.dtype());
  GemmKey key;
  std::memset(&key, 0, sizeof(key));  // padding too: the key is hashed and compared as bytes
  key.device = device;
  key.data = ti.data;
  key.compute = ti.compute;
  // column-major: D^T (N, rows) = B^T (N, K) @ A^T (K, rows)
  key.m = n;
  key.n = rows;
  key.k = k;
  key.trans_a = b.view.col_major;
  key.lda = b.view.ld;
  key.trans_b = a.view.col_major;
  key.ldb = a_ld;
  key.ldc = n;
  key.batch = inner;
  key.stride_a = inner > 1 ? bst[2].back() : 0;
  key.stride_b = inner > 1 ? bst[1].back() : 0;
  key.stride_c = inner > 1 ? bst[0].back() : 0;

  const auto* a_base = static_cast<const char*>(a.t.raw_data());
  const auto* b_base = static_cast<const char*>(b.t.raw_data());
  auto* c_base = static_cast<char*>(out.raw_data());
  const auto* add_base = addend != nullptr ? static_cast<const char*>(addend->raw_data()) : nullptr;  // same layout as D
  const auto addr = [](const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); };
  key.align_a = alignment_of({addr(b_base), static_cast<uint64_t>(key.lda) * es, static_cast<uint64_t>(key.stride_a) * es});
  key.align_b = alignment_of({addr(a_base), static_cast<uint64_t>(key.ldb) * es, static_cast<uint64_t>(key.stride_b) * es});
  key.align_c = alignment_of({addr(c_base), static_cast<uint64_t>(key.ldc) * es, static_cast<uint64_t>(key.stride_c) * es,
                              add_base != nullptr ? addr(add_base) : 0});
  // Outer batch entries (dims that did not merge) start at other offsets: require the alignment
  // of every entry's offset as well.
  const int64_t outer = folded ? 1 : numel(batch) / inner;
  std::vector<std::array<int64_t, 3>> offsets(static_cast<size_t>(outer));  // (outer, {c, a, b}) in elements
  for (int64_t i = 0; i < outer; ++i) {
    int64_t rem = i;
    std::array<int64_t, 3> off{0, 0, 0};
    for (size_t d = batch.size() - 1; d-- > 0;) {
      const int64_t idx = rem % batch[d];
      rem /= batch[d];
      for (size_t j = 0; j < 3; ++j) off[j] += idx * bst[j][d];
    }
    offsets[static_cast<size_t>(i)] = off;
    key.align_c = std::min(key.align_c, alignment_of({static_cast<uint64_t>(off[0]) * es}));
    key.align_b = std::min(key.align_b, alignment_of({static_cast<uint64_t>(off[1]) * es}));
    key.align_a = std::min(key.align_a, alignment_of({static_cast<uint64_t>(off[2]) * es}));
  }

  cublasLtHandle_t handle = handle_for(device);
  Plan* found = plan_for(key, ti, handle);
  if (found == nullptr) return false;
  Plan& plan = *found;
  Workspace& workspace = workspace_for(device, stream);
  std::lock_guard<std::mutex> enqueue(workspace.enqueue);
  void* ws = workspace.buffer.raw_data();
  const float one_f = 1.0f, zero_f = 0.0f, alpha_f = static_cast<float>(alpha_value);
  const double one_d = 1.0, zero_d = 0.0;
  const bool f64 = ti.scale == CUDA_R_64F;
  const void* alpha = f64 ? static_cast<const void*>(&alpha_value) : static_cast<const void*>(&alpha_f);
  const void* beta = add_base != nullptr ? (f64 ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f))
                     : f64               ? static_cast<const void*>(&zero_d)
                                         : static_cast<const void*>(&zero_f);
  // Tuning writes D several times: not where D is also C (out += a @ b); a later call of the key tunes.
  if (!plan.candidates.empty() && add_base != c_base) {
    const auto& off = offsets.front();
    void* d = c_base + off[0] * static_cast<int64_t>(es);
    const void* c = add_base != nullptr ? add_base + off[0] * static_cast<int64_t>(es) : d;
    const void* a_ptr = b_base + off[2] * static_cast<int64_t>(es);
    const void* b_ptr = a_base + off[1] * static_cast<int64_t>(es);
    float best = 0;
    for (const cublasLtMatmulAlgo_t& algo : plan.candidates) {
      auto run = [&] {
        return cublasLtMatmul(handle, plan.desc, alpha, a_ptr, plan.a, b_ptr, plan.b, beta, c, plan.c, d, plan.c, &algo, ws,
                              kWorkspaceBytes, static_cast<cudaStream_t>(stream));
      };
      if (run() != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; an algorithm that refuses is skipped
      Event start(true), stop(true);
      start.record(current_stream(device));
      for (int i = 0; i < kTuneRuns; ++i) KILN_CUBLAS_CHECK(run(), op);
      stop.record(current_stream(device));
      stop.synchronize();
      const float ms = start.elapsed_ms(stop);
      if (best == 0 || ms < best) best = ms, plan.algo = algo;
    }
    plan.candidates.clear();
  }
  for (const auto& off : offsets) {
    void* d = c_base + off[0] * static_cast<int64_t>(es);
    const void* c = add_base != nullptr ? add_base + off[0] * static_cast<int64_t>(es) : d;
    KILN_CUBLAS_CHECK(cublasLtMatmul(handle, plan.desc, alpha, b_base + off[2] * static_cast<int64_t>(es), plan.a,
                                     a_base + off[1] * static_cast<int64_t>(es), plan.b, beta, c, plan.c, d, plan.c,
                                     &plan.algo, ws, kWorkspaceBytes, static_cast<cudaStream_t>(stream)),
                      op);
  }
  return true;
}

// try_gemm, retried on fresh (aligned, contiguous) copies of the operands when cuBLASLt has no
// algorithm for their layouts.
void gemm(const Tensor& a, const Tensor& b, const Tensor* addend, double alpha, Tensor& out, const char* op) {
  Tensor add;  // contiguous, as D is
  if (addend != nullptr) add = addend->is_contiguous() ? *addend : contiguous(addend->detach());
  const Tensor* c = addend != nullptr ? &add : nullptr;
  if (try_gemm(a, b, c, alpha, out, op)) return;
  Tensor c_copy = c != nullptr ? add.clone() : Tensor();
  KILN_CHECK(try_gemm(a.detach().clone(), b.detach().clone(), c != nullptr ? &c_copy : nullptr, alpha, out, op), op,
             "cuBLASLt found no algorithm for {} @ {} in {}", shape_str(a.shape()), shape_str(b.shape()),
             dtype_name(a.dtype()));
}

void matmul_kernel(const prim::Matmul& p, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  gemm(in[0], in[1], in.size() > 2 ? &in[2] : nullptr, p.alpha(), out[0], "matmul");
}

}  // namespace

void set_allow_tf32(bool allow) { g_allow_tf32.store(allow); }
bool allow_tf32() { return g_allow_tf32.load(); }
void set_gemm_tuning(bool on) { g_tune.store(on); }
bool gemm_tuning() { return g_tune.load(); }

KILN_REGISTER(cuda_matmul_kernels) { register_kernel<prim::Matmul>(DeviceType::cuda, &matmul_kernel); }

}  // namespace kiln::cuda

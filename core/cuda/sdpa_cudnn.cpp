// cuDNN's fused SDPA through the header-only cuDNN frontend: one graph per (direction, dtype, sizes,
// strides, mask, scale) built once and cached per device (building takes tens of milliseconds), run
// on the tensors' current stream with a per-device handle and workspace from kiln's allocator.
#include "core/cuda/sdpa_cudnn.h"

#include <cudnn.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cudnn_frontend.h>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "core/cpu/copy.h"
#include "core/cuda/attention.cuh"
#include "core/cuda/check.h"
#include "core/cuda/copy.cuh"
#include "core/cuda/tensor_args.h"

namespace kiln::cuda {
namespace fe = cudnn_frontend;
namespace {

constexpr const char* kOp = "scaled_dot_product_attention";

SdpaBackend backend_from_env() {
  const char* e = std::getenv("KILN_SDPA_BACKEND");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return SdpaBackend::automatic;
  if (std::strcmp(e, "cudnn") == 0) return SdpaBackend::cudnn;
  if (std::strcmp(e, "flash") == 0) return SdpaBackend::flash;
  KILN_FAIL(kOp, "KILN_SDPA_BACKEND must be auto, cudnn or flash, found '{}'", e);
}

std::atomic<int> g_backend{-1};  // -1: not read from the environment yet
thread_local const char* t_last_path = "";
thread_local int t_last_backward_calls = 0;

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : key) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// A handle and a plan cache per device; the mutex covers both (setting the handle's stream and
// enqueueing are quick; a graph build holds it for its duration).
struct DeviceState {
  std::mutex mu;
  cudnnHandle_t handle = nullptr;  // lives as long as the process, as CUDA contexts do
  std::unordered_map<std::vector<int64_t>, std::shared_ptr<const Plan>, KeyHash> plans;  // null: refused
};
constexpr size_t kMaxPlans = 512;  // sequence lengths vary; past this the cache starts over

DeviceState& device_state(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<DeviceState>> states;
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<DeviceState>& s = states[device];
  if (!s) s = std::make_unique<DeviceState>();
  return *s;
}

void ensure_handle(DeviceState& ds) {
  if (ds.handle != nullptr) return;
  const cudnnStatus_t st = cudnnCreate(&ds.handle);
  KILN_CHECK(st == CUDNN_STATUS_SUCCESS, kOp, "cudnnCreate failed: {}", cudnnGetErrorString(st));
}

fe::DataType_t fe_dtype(DType d) { return d == DType::bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF; }

// Strides cuDNN can take: unit head-dim stride, 16-byte aligned rows and base pointer.
bool cudnn_layout_ok(const Tensor& t) {
  if (t.strides()[3] != 1) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.strides()[static_cast<size_t>(d)] <= 0 || t.strides()[static_cast<size_t>(d)] % 8 != 0)) {
      return false;
    }
  }
  return reinterpret_cast<uintptr_t>(t.raw_data()) % 16 == 0;
}

// `t` itself, or a contiguous copy when its layout is one cuDNN cannot take.
Tensor cudnn_operand(const Tensor& t) {
  if (cudnn_layout_ok(t)) return t;
  Tensor c = empty(t.shape(), t.dtype(), t.device());
  const Strided<2> st = make_strided<2>(t.shape(), {&c, &t}, kOp);
  KILN_CUDA_CHECK(launch_attn_contiguous(t.numel(), static_cast<int>(itemsize(t.dtype())), st, c.raw_data(),
                                         t.raw_data(), stream_of(t)),
                  kOp);
  return c;
}

// Strides with those of size-1 dims replaced by a non-overlapping value (their value is arbitrary).
std::vector<int64_t> strides_of(const Tensor& t) {
  std::vector<int64_t> s = t.strides();
  for (int d = static_cast<int>(s.size()) - 2; d >= 0; --d) {
    const size_t i = static_cast<size_t>(d);
    if (t.shape()[i] == 1) s[i] = s[i + 1] * t.shape()[i + 1];
  }
  return s;
}

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph& g, const char* name, int64_t uid, const Tensor& t) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(t.shape()).set_stride(strides_of(t)));
}

template <class Attrs> void set_mask(Attrs& a, bool causal, int64_t t, int64_t s) {
  if (!causal) return;
  if (t == s) {
    a.set_causal_mask(true);
  } else {
    a.set_causal_mask_bottom_right(true);  // the last query sees the last key
  }
}

// Validates and builds `g`; null (and a note on stderr with KILN_SDPA_VERBOSE set) when refused.
std::shared_ptr<const Plan> finish(const std::shared_ptr<fe::graph::Graph>& g, cudnnHandle_t h, const char* what) {
  fe::error_t st = g->validate();
  if (st.is_good()) st = g->build_operation_graph(h);
  if (st.is_good()) st = g->create_execution_plans({fe::HeurMode_t::A});
  if (st.is_good()) st = g->check_support(h);
  if (st.is_good()) st = g->build_plans(h);
  int64_t ws = 0;
  if (st.is_good()) st = g->get_workspace_size(ws);
  if (st.is_bad()) {
    if (std::getenv("KILN_SDPA_VERBOSE") != nullptr) std::fprintf(stderr, "[sdpa] cuDNN refused %s: %s\n", what, st.get_message().c_str());
    return nullptr;
  }
  auto plan = std::make_shared<Plan>();
  plan->graph = g;
  plan->workspace = ws;
  return plan;
}

// The cached plan for `key`, building it with `build` on a miss.
template <class Build>
std::shared_ptr<const Plan> find_plan(DeviceState& ds, const std::vector<int64_t>& key, Build&& build) {
  auto it = ds.plans.find(key);
  if (it != ds.plans.end()) return it->second;
  std::shared_ptr<const Plan> plan;
  try {
    plan = build();
  } catch (const std::exception& e) {  // the frontend throws on some malformed graphs: treat as refused
    if (std::getenv("KILN_SDPA_VERBOSE") != nullptr) std::fprintf(stderr, "[sdpa] cuDNN graph build threw: %s\n", e.what());
    plan = nullptr;
  }
  if (ds.plans.size() >= kMaxPlans) ds.plans.clear();
  ds.plans.emplace(key, plan);
  return plan;
}

void execute(const Plan& plan, DeviceState& ds, std::unordered_map<int64_t, void*>& pack, const Tensor& like,
             const char* op) {
  const cudnnStatus_t st = cudnnSetStream(ds.handle, static_cast<cudaStream_t>(stream_of(like)));
  KILN_CHECK(st == CUDNN_STATUS_SUCCESS, op, "cudnnSetStream failed: {}", cudnnGetErrorString(st));
  // freed right after enqueueing: the stream-ordered allocator reuses it only behind this work
  Storage ws = plan.workspace > 0 ? allocate_storage(static_cast<size_t>(plan.workspace), like.device()) : nullptr;
  fe::error_t err = plan.graph->execute(ds.handle, pack, ws ? ws->data() : nullptr);
  KILN_CHECK(err.is_good(), op, "cuDNN SDPA execution failed: {}", err.get_message());
}

std::vector<int64_t> base_key(int64_t kind, const Tensor& q, const Tensor& v, int64_t hkv, int64_t s, bool causal,
                              double scale) {
  int64_t scale_bits = 0;
  std::memcpy(&scale_bits, &scale, sizeof(scale));
  return {kind, static_cast<int64_t>(q.dtype()), causal ? 1 : 0, scale_bits, q.size(0), q.size(1), hkv, q.size(2),
          s,    q.size(3),                       v.size(3)};
}

void append_strides(std::vector<int64_t>& key, const Tensor& t) {
  for (int64_t x : strides_of(t)) key.push_back(x);
}

}  // namespace

SdpaBackend sdpa_backend() {
  int b = g_backend.load(std::memory_order_relaxed);
  if (b < 0) {
    b = static_cast<int>(backend_from_env());
    g_backend.store(b, std::memory_order_relaxed);
  }
  return static_cast<SdpaBackend>(b);
}

void set_sdpa_backend(SdpaBackend backend) { g_backend.store(static_cast<int>(backend), std::memory_order_relaxed); }

const char* last_sdpa_path() { return t_last_path; }
void set_last_sdpa_path(const char* path) { t_last_path = path; }

bool cudnn_sdpa_eligible(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  if (q.dtype() != DType::bf16 && q.dtype() != DType::f16) return false;
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) return false;
  return !(causal && q.size(2) > k.size(2));  // cuDNN has no "row sees no key" convention
}

bool cudnn_sdpa_forward(const prim::ScaledDotProductAttention& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        Tensor& out, Tensor& lse) {
  if (!cudnn_sdpa_eligible(q, k, v, p.causal())) return false;
  const Tensor qc = cudnn_operand(q), kc = cudnn_operand(k), vc = cudnn_operand(v);
  // out is written through its strides ((B, T, H, D) memory for heads_last) where cuDNN takes them
  const bool out_ok = cudnn_layout_ok(out);
  const Tensor oc = out_ok ? out : empty(out.shape(), out.dtype(), out.device());
  std::vector<int64_t> key = base_key(0, qc, vc, kc.size(1), kc.size(2), p.causal(), p.scale());
  for (const Tensor* t : {&qc, &kc, &vc, &oc}) append_strides(key, *t);

  DeviceState& ds = device_state(q.device().index);
  std::lock_guard<std::mutex> lock(ds.mu);
  ensure_handle(ds);
  std::shared_ptr<const Plan> plan = find_plan(ds, key, [&]() -> std::shared_ptr<const Plan> {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe_dtype(q.dtype()))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto tq = input(*g, "Q", kQ, qc), tk = input(*g, "K", kK, kc), tv = input(*g, "V", kV, vc);
    auto opts = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(true).set_attn_scale(
        static_cast<float>(p.scale()));
    set_mask(opts, p.causal(), qc.size(2), kc.size(2));
    auto outs = g->sdpa(tq, tk, tv, opts);
    outs[0]->set_output(true).set_uid(kO).set_dim(oc.shape()).set_stride(strides_of(oc));
    outs[1]->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT)
        .set_dim({q.size(0), q.size(1), q.size(2), 1}).set_stride({q.size(1) * q.size(2), q.size(2), 1, 1});
    return finish(g, ds.handle, "the forward");
  });
  if (!plan) return false;
  std::unordered_map<int64_t, void*> pack{{kQ, qc.raw_data()},  {kK, kc.raw_data()},   {kV, vc.raw_data()},
                                          {kO, oc.raw_data()}, {kStats, lse.raw_data()}};
  execute(*plan, ds, pack, q, kOp);
  if (!out_ok) {
    const Strided<2> st = make_strided<2>(out.shape(), {&out, &oc}, kOp);
    KILN_CUDA_CHECK(launch_copy_strided(out.raw_data(), out.dtype(), oc.raw_data(), oc.dtype(), st, out.numel(),
                                        stream_of(out)),
                    kOp);
  }
  return true;
}

namespace {

// One cuDNN backward call on these operands (whole tensors, or pieces of them viewed with their
// strides: the outputs are written in place); false when cuDNN refuses. Its plan's workspace goes to
// `workspace` (the caller sizes the pieces by it); with `run` false only the plan is built.
bool backward_call(DeviceState& ds, const prim::SdpaBackward& p, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& o, const Tensor& dout, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv, int64_t* workspace, bool run) {
  std::vector<int64_t> key = base_key(1, q, v, k.size(1), k.size(2), p.causal(), p.scale());
  for (const Tensor* t : {&q, &k, &v, &o, &dout, &lse, &dq, &dk, &dv}) append_strides(key, *t);
  std::shared_ptr<const Plan> plan = find_plan(ds, key, [&]() -> std::shared_ptr<const Plan> {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe_dtype(q.dtype()))
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto tq = input(*g, "Q", kQ, q), tk = input(*g, "K", kK, k), tv = input(*g, "V", kV, v);
    auto to = input(*g, "O", kO, o), tg = input(*g, "dO", kDO, dout);
    std::vector<int64_t> lse_strides = strides_of(lse);
    lse_strides.push_back(1);
    auto stats = g->tensor(fe::graph::Tensor_attributes()
                               .set_name("Stats")
                               .set_uid(kStats)
                               .set_data_type(fe::DataType_t::FLOAT)
                               .set_dim({q.size(0), q.size(1), q.size(2), 1})
                               .set_stride(lse_strides));
    auto opts = fe::graph::SDPA_backward_attributes().set_name("sdpa_backward").set_attn_scale(
        static_cast<float>(p.scale()));
    set_mask(opts, p.causal(), q.size(2), k.size(2));
    auto grads = g->sdpa_backward(tq, tk, tv, to, tg, stats, opts);
    grads[0]->set_output(true).set_uid(kDQ).set_dim(dq.shape()).set_stride(strides_of(dq));
    grads[1]->set_output(true).set_uid(kDK).set_dim(dk.shape()).set_stride(strides_of(dk));
    grads[2]->set_output(true).set_uid(kDV).set_dim(dv.shape()).set_stride(strides_of(dv));
    return finish(g, ds.handle, "the backward");
  });
  if (!plan) return false;
  *workspace = plan->workspace;
  if (!run) return true;
  std::unordered_map<int64_t, void*> pack{{kQ, q.raw_data()},   {kK, k.raw_data()},     {kV, v.raw_data()},
                                          {kO, o.raw_data()},   {kDO, dout.raw_data()}, {kStats, lse.raw_data()},
                                          {kDQ, dq.raw_data()}, {kDK, dk.raw_data()},   {kDV, dv.raw_data()}};
  execute(*plan, ds, pack, q, "sdpa_backward");
  return true;
}

std::atomic<size_t> g_backward_workspace_limit{size_t{512} << 20};

}  // namespace

void set_sdpa_backward_workspace_limit(size_t bytes) { g_backward_workspace_limit.store(bytes); }
size_t sdpa_backward_workspace_limit() { return g_backward_workspace_limit.load(); }
int last_sdpa_backward_calls() { return t_last_backward_calls; }

bool cudnn_sdpa_backward(const prim::SdpaBackward& p, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& out, const Tensor& dout, const Tensor& lse_f32, Tensor& dq, Tensor& dk,
                         Tensor& dv) {
  if (!cudnn_sdpa_eligible(q, k, v, p.causal())) return false;
  if (!cudnn_layout_ok(dq) || !cudnn_layout_ok(dk) || !cudnn_layout_ok(dv)) return false;  // the flash kernel's, then
  const Tensor qc = cudnn_operand(q), kc = cudnn_operand(k), vc = cudnn_operand(v);
  const Tensor oc = cudnn_operand(out), gc = cudnn_operand(dout);
  DeviceState& ds = device_state(q.device().index);
  std::lock_guard<std::mutex> lock(ds.mu);
  ensure_handle(ds);
  // cuDNN's workspace grows with batch x heads x length (an f32 dq accumulator, and with grouped kv
  // heads the per-query-head dk and dv before their sum: 4 GiB for Llama 3.1 8B at T131072). Past
  // the limit the work goes in pieces, one sequence and a group of kv heads (with their query heads)
  // per call: the same sums, a workspace a fraction the size.
  const int64_t batch = qc.size(0), hkv = kc.size(1), rep = qc.size(1) / hkv;
  struct Split {
    int64_t batch, group;  // sequences and kv heads per call
  };
  int64_t workspace = 0;
  auto call = [&](int64_t b0, int64_t h0, const Split& sp, bool run) {
    auto part = [&](const Tensor& t, int64_t per) {  // sequences [b0, b0 + sp.batch), heads [h0 * per, (h0 + sp.group) * per)
      Shape shape = t.shape();
      shape[0] = sp.batch;
      shape[1] = sp.group * per;
      return cpu::raw_view(t, shape, t.strides(), t.offset() + b0 * t.strides()[0] + h0 * per * t.strides()[1]);
    };
    return backward_call(ds, p, part(qc, rep), part(kc, 1), part(vc, 1), part(oc, rep), part(gc, rep),
                         part(lse_f32, rep), part(dq, rep), part(dk, 1), part(dv, 1), &workspace, run);
  };
  // Each piece's f32 lse must start 16-byte aligned (the other operands' pieces are, by their strides).
  auto aligned = [&](int64_t g) { return (g * rep * qc.size(2)) % 4 == 0 && (batch == 1 || (qc.size(1) * qc.size(2)) % 4 == 0); };
  std::vector<Split> candidates{{batch, hkv}};  // the fewest calls first
  if (batch > 1 && aligned(hkv)) candidates.push_back({1, hkv});
  for (int64_t g = hkv - 1; g >= 1; --g) {
    if (hkv % g == 0 && aligned(g)) candidates.push_back({1, g});
  }
  const size_t limit = sdpa_backward_workspace_limit();
  std::optional<Split> chosen;  // the first whose workspace fits, else the last cuDNN builds
  for (const Split& sp : candidates) {
    if (!call(0, 0, sp, /*run=*/false)) break;
    chosen = sp;
    if (limit != 0 && static_cast<size_t>(workspace) <= limit) break;
  }
  if (!chosen) return false;
  for (int64_t b0 = 0; b0 < batch; b0 += chosen->batch)
    for (int64_t h0 = 0; h0 < hkv; h0 += chosen->group) call(b0, h0, *chosen, /*run=*/true);
  t_last_backward_calls = static_cast<int>((batch / chosen->batch) * (hkv / chosen->group));
  return true;
}

}  // namespace kiln::cuda

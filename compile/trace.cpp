// The tracer: a DispatchHandler that turns each dispatched op into a graph node and returns
// placeholders. Placeholders are told apart by identity, and also by layout (each gets its own
// offset range), because autograd::apply hands out detached copies of a custom Function's outputs:
// same (absent) storage, offset, shape and strides, new TensorImpl.
#include "compile/trace.h"

#include <map>
#include <tuple>
#include <unordered_map>

#include "autograd/engine.h"
#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "core/dispatch.h"
#include "core/ops/copy.h"
#include "core/ops/creation.h"

namespace kiln::compile {
namespace {

thread_local int t_tracing = 0;

// Placeholders get offsets kSpan apart, so a view's offset stays inside its base's range.
constexpr int64_t kSpan = int64_t(1) << 40;

using LayoutKey = std::tuple<int64_t, Shape, Shape, DType, int, int>;
LayoutKey layout_key(const Tensor& t) {
  return {t.offset(), t.shape(), t.strides(), t.dtype(), static_cast<int>(t.device().type), t.device().index};
}

TensorMeta meta_of(const Tensor& t) { return {t.shape(), t.dtype(), t.device()}; }

}  // namespace

struct TraceState::Maps {
  struct PerTrace {
    std::unordered_map<const TensorImpl*, int> by_impl;  // placeholder -> value id
    std::map<LayoutKey, int> by_layout;
    std::unordered_map<int, int> external_input;         // external index -> input value id
    std::unordered_map<int, int> saved_input;            // forward value id -> input value id (backward only)
  };
  PerTrace trace[2];
  std::unordered_map<const TensorImpl*, int> external_index;  // captured tensor -> external index
  std::vector<Tensor> alive;  // every tensor seen, so no address is reused while the maps hold it
  int64_t next_offset = kSpan;
};

namespace {

class Tracer : public DispatchHandler {
 public:
  Tracer(TraceState& s, int phase) : s_(s), m_(*s.maps), phase_(phase) {}

  Graph& graph() { return phase_ == 0 ? s_.forward : s_.backward; }

  // A placeholder with its own offset range, registered as value `id` of the current trace.
  Tensor make_placeholder(const TensorMeta& m, int id, const Shape* strides = nullptr) {
    Tensor p = placeholder(m.shape, m.dtype, m.device);
    p.impl()->offset = m_.next_offset;
    if (strides) p.impl()->strides = *strides;
    m_.next_offset += kSpan;
    remember(p, id);
    return p;
  }

  void remember(const Tensor& t, int id) {
    auto& pt = m_.trace[phase_];
    pt.by_impl[t.impl().get()] = id;
    pt.by_layout.emplace(layout_key(t), id);
    m_.alive.push_back(t);
  }

  // The value id, in the current trace, of a tensor an op reads.
  int resolve(const Tensor& t) {
    auto& cur = m_.trace[phase_];
    if (auto it = cur.by_impl.find(t.impl().get()); it != cur.by_impl.end()) return it->second;
    if (!t.storage()) {
      if (auto it = cur.by_layout.find(layout_key(t)); it != cur.by_layout.end()) return it->second;
      if (phase_ == 1) {
        auto& fw = m_.trace[0];
        int fv = -1;
        if (auto it = fw.by_impl.find(t.impl().get()); it != fw.by_impl.end()) {
          fv = it->second;
        } else if (auto it2 = fw.by_layout.find(layout_key(t)); it2 != fw.by_layout.end()) {
          fv = it2->second;
        }
        if (fv >= 0) return saved_input(fv, t);
      }
      KILN_FAIL("compile", "a tensor without data that this trace did not make reached an op ({} {})",
                dtype_name(t.dtype()), shape_str(t.shape()));
    }
    return external_input(t);
  }

  int saved_input(int forward_value, const Tensor& t) {
    auto& cur = m_.trace[1];
    auto [it, fresh] = cur.saved_input.emplace(forward_value, -1);
    if (fresh) {
      const int id = static_cast<int>(graph().values.size());
      graph().add_input(meta_of(t), {InputKind::saved, forward_value}, {1, id});
      it->second = id;
    }
    return it->second;
  }

  int external_input(const Tensor& t) {
    auto [ei, fresh_ext] = m_.external_index.emplace(t.impl().get(), static_cast<int>(s_.externals.size()));
    if (fresh_ext) {
      s_.externals.push_back(t);
      m_.alive.push_back(t);
    }
    auto& cur = m_.trace[phase_];
    auto [it, fresh] = cur.external_input.emplace(ei->second, -1);
    if (fresh) {
      const int id = static_cast<int>(graph().values.size());
      graph().add_input(meta_of(t), {InputKind::external, ei->second}, {phase_, id}, t.requires_grad());
      it->second = id;
    }
    return it->second;
  }

  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (op->is_view()) {
      bool traced = false;
      for (const Tensor& t : inputs) traced = traced || !t.storage();
      if (!traced) return dispatch_next(op, inputs);  // a view of a captured tensor: a real alias
      std::vector<int> ids;
      for (const Tensor& t : inputs) ids.push_back(resolve(t));
      Tensor out = op->make_view(inputs);
      const int id = static_cast<int>(graph().values.size());
      graph().add_node(op, std::move(ids), {meta_of(out)}, {phase_, static_cast<int>(graph().nodes.size())}, {{phase_, id}});
      remember(out, id);
      return {out};
    }
    bool traced = false;
    for (const Tensor& t : inputs) traced = traced || !t.storage();
    // Copies, random numbers and aranges of nothing traced run now: modules cache such tensors
    // (a rotary table moved to the GPU), which must not be placeholders; the next call's trace
    // finds them again (as captured tensors), and random ops draw this call's numbers, as eager does.
    if (!traced && (dynamic_cast<const prim::Copy*>(op.get()) || dynamic_cast<const prim::Random*>(op.get()) ||
                    dynamic_cast<const prim::Arange*>(op.get())))
      return dispatch_next(op, inputs);
    std::vector<int> ids;
    for (const Tensor& t : inputs) ids.push_back(resolve(t));
    const std::vector<TensorMeta> metas = op->infer(inputs);
    const int first = static_cast<int>(graph().values.size());
    std::vector<Origin> origins;
    for (size_t i = 0; i < metas.size(); ++i) origins.push_back({phase_, first + static_cast<int>(i)});
    graph().add_node(op, std::move(ids), metas, {phase_, static_cast<int>(graph().nodes.size())}, origins);
    std::vector<Tensor> out;
    for (size_t i = 0; i < metas.size(); ++i) out.push_back(make_placeholder(metas[i], first + static_cast<int>(i)));
    return out;
  }

  void run_into(const PrimitivePtr& op, const std::vector<Tensor>&, std::vector<Tensor>&) override {
    if (s_.pure) s_.impure_op = op->name();
    s_.pure = false;  // the caller runs this call eagerly instead; nothing is written now
  }

 private:
  TraceState& s_;
  TraceState::Maps& m_;
  int phase_;
};

// Marks this thread as tracing, and hides the custom Functions the traced code applies (on placeholders)
// from any FunctionObserver: a checkpoint's record and recompute see the compiled call as one Function.
struct TracingFlag {
  TracingFlag() { ++t_tracing; }
  ~TracingFlag() { --t_tracing; }
  autograd::FunctionObserverScope hidden{nullptr};
};

}  // namespace

bool tracing() { return t_tracing > 0; }

std::shared_ptr<TraceState> trace_forward(const Fn& fn, const std::vector<Tensor>& args) {
  auto s = std::make_shared<TraceState>();
  s->maps = std::make_shared<TraceState::Maps>();
  Tracer tracer(*s, 0);
  for (size_t i = 0; i < args.size(); ++i) {
    const Tensor& a = args[i];
    KILN_CHECK(a.defined(), "compile", "argument {} is an undefined tensor", i);
    const int id = static_cast<int>(s->forward.values.size());
    s->forward.add_input(meta_of(a), {InputKind::arg, static_cast<int>(i)}, {0, id}, a.requires_grad());
    Tensor p = tracer.make_placeholder(meta_of(a), id, &a.strides());
    if (a.requires_grad()) {
      p.set_requires_grad(true);
      s->grad_args.push_back(static_cast<int>(i));
    }
    s->arg_proxies.push_back(p);
  }
  std::vector<Tensor> out;
  const uint64_t first_node = autograd::next_node_sequence();  // the trace's own nodes come from here
  {
    TracingFlag flag;
    HandlerScope scope(&tracer);
    out = fn(s->arg_proxies);
  }
  const char* opaque = autograd::grad_enabled() ? autograd::untraceable_function(out, first_node) : nullptr;
  KILN_CHECK(opaque == nullptr, "compile",
             "it runs the custom autograd Function '{}', whose backward the trace cannot follow", opaque);
  for (size_t i = 0; i < out.size(); ++i) {
    KILN_CHECK(out[i].defined(), "compile", "the traced function returned an undefined tensor (output {})", i);
    s->forward.outputs.push_back(tracer.resolve(out[i]));
    if (out[i].requires_grad() && autograd::grad_enabled()) {
      s->grad_outputs.push_back(static_cast<int>(i));
      s->needs_grad = true;
    }
  }
  s->outputs = std::move(out);
  s->forward_externals = s->externals.size();
  for (size_t e = 0; e < s->externals.size(); ++e)
    if (s->externals[e].requires_grad()) s->grad_externals.push_back(static_cast<int>(e));
  return s;
}

void trace_backward(TraceState& s) {
  KILN_CHECK(s.needs_grad, "compile", "trace_backward: no output of the traced forward requires grad");
  s.backward = Graph{};
  s.maps->trace[1] = {};
  s.externals.resize(s.forward_externals);  // a second trace of the backward finds its own
  for (auto it = s.maps->external_index.begin(); it != s.maps->external_index.end();)
    it = it->second >= static_cast<int>(s.forward_externals) ? s.maps->external_index.erase(it) : std::next(it);
  Tracer tracer(s, 1);
  std::vector<Tensor> roots, cotangents, wrt;
  for (size_t j = 0; j < s.grad_outputs.size(); ++j) {
    const Tensor& o = s.outputs[static_cast<size_t>(s.grad_outputs[j])];
    const int id = static_cast<int>(s.backward.values.size());
    s.backward.add_input(meta_of(o), {InputKind::cotangent, static_cast<int>(j)}, {1, id});
    roots.push_back(o);
    cotangents.push_back(tracer.make_placeholder(meta_of(o), id));
  }
  for (int a : s.grad_args) wrt.push_back(s.arg_proxies[static_cast<size_t>(a)]);
  for (int e : s.grad_externals) wrt.push_back(s.externals[static_cast<size_t>(e)]);
  std::vector<Tensor> grads;
  {
    TracingFlag flag;
    autograd::NoGradGuard no_grad;  // first-order gradients: the vjps record no history of their own
    HandlerScope scope(&tracer);
    grads = autograd::grad(roots, wrt, cotangents, /*retain_graph=*/true);
  }
  for (const Tensor& g : grads) s.backward.outputs.push_back(tracer.resolve(g));
  s.has_backward = true;
}

std::shared_ptr<TraceState> trace(const Fn& fn, const std::vector<Tensor>& example_inputs, bool backward) {
  std::shared_ptr<TraceState> s = trace_forward(fn, example_inputs);
  if (backward && s->needs_grad) trace_backward(*s);
  return s;
}

}  // namespace kiln::compile

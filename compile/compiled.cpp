// Compiled calls: trace, look up (or build) the forward plan for the trace's structure and sizes,
// run it; with gradients, an autograd Function whose backward traces the vjps of this call's
// placeholder graph and runs the backward plan built against what the forward kept.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "autograd/function.h"
#include "autograd/grad_mode.h"
#include "compile/compile.h"
#include "compile/log.h"
#include "compile/plan.h"
#include "compile/recompute.h"
#include "core/ops.h"
#include "core/random.h"

namespace kiln::compile {

bool log_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_COMPILE_LOG");
    return e && *e && std::string(e) != "0";
  }();
  return on;
}

void log_text(const std::string& title, const std::string& body) {
  std::fprintf(stderr, "[compile] %s\n%s", title.c_str(), body.c_str());
}

Counters& counters() {
  static Counters c;
  return c;
}

struct CompiledFunction::State {
  Fn fn;
  CompileOptions options;
};

namespace {

constexpr size_t kMaxVariants = 8;  // plans kept per structure, each with its own static sizes

struct BackwardPlan {
  SizeProfile profile;
  Plan plan;
  bool reads_outputs = false;  // some forward output's value (not an argument returned as is)
};

// A forward plan, and the backward plans built against the values it keeps.
struct ForwardPlan {
  Signature sig;
  SizeProfile profile;
  Plan plan;
  std::vector<int> kept;  // forward trace value ids, in plan.kept's order
  std::mutex mu;
  std::unordered_map<uint64_t, std::vector<std::shared_ptr<BackwardPlan>>> backward;
  bool backward_reads_outputs = false;  // a backward plan built so far reads a forward output
  std::shared_ptr<const Plan> kept_only;  // the plan less what only the outputs need (built when first asked)
};

// Whether a backward plan reads the value of a forward output made by the forward (an output that is
// an argument or a captured tensor is read from there).
bool reads_forward_outputs(const Plan& p, const Graph& forward) {
  const std::vector<std::vector<int>> users = p.graph.users();
  const std::vector<bool> escaping = p.graph.escaping();
  for (int v : p.graph.inputs) {
    const Value& val = p.graph.values[static_cast<size_t>(v)];
    if (val.input.kind != InputKind::saved || (users[static_cast<size_t>(v)].empty() && !escaping[static_cast<size_t>(v)]))
      continue;
    const int s = val.input.index;
    if (forward.values[static_cast<size_t>(s)].producer >= 0 &&
        std::find(forward.outputs.begin(), forward.outputs.end(), s) != forward.outputs.end())
      return true;
  }
  return false;
}

struct Cache {
  std::mutex mu;
  std::unordered_map<uint64_t, std::vector<std::shared_ptr<ForwardPlan>>> entries;
};
Cache& cache() {
  static Cache c;
  return c;
}

uint64_t options_seed(const CompileOptions& o, const std::string& key, bool grad) {
  uint64_t h = hash_combine(std::hash<std::string>{}(key), grad);
  h = hash_combine(h, static_cast<uint64_t>(o.automatic_dynamic) * 2 + o.fuse);
  for (auto [a, d] : o.dynamic_dims) h = hash_combine(hash_combine(h, static_cast<uint64_t>(a)), static_cast<uint64_t>(d));
  return h;
}

Bindings forward_bindings(const TraceState& t, const std::vector<Tensor>& args) {
  Bindings b;
  b.traces[0] = &t.forward;
  b.input = [&t, &args](const Value& v) {
    return v.input.kind == InputKind::arg ? args[static_cast<size_t>(v.input.index)]
                                          : t.externals[static_cast<size_t>(v.input.index)];
  };
  return b;
}

void log_plan(const std::string& what, const CompileOptions& o, const Graph& traced, const Plan& p, const SizeProfile& prof) {
  if (!log_enabled()) return;
  log_text(fmt::format("{} graph of '{}' ({} nodes traced, {} symbolic sizes)", what, o.name, traced.nodes.size(),
                       prof.num_dynamic()),
           traced.str());
  log_text(fmt::format("{} plan of '{}' after CSE, DCE, folds and fusion", what, o.name),
           p.str() + p.graph.str() + fusion_str(p.graph, p.fusion));
}

void count_plan(const Plan& p) {
  Counters& c = counters();
  ++c.compilations;
  c.fused_groups += static_cast<int64_t>(p.fusion.groups.size());
  c.folded_adds += p.folded_adds;
}

std::shared_ptr<BackwardPlan> backward_plan(ForwardPlan& fp, const TraceState& t, const std::vector<Tensor>& args,
                                            const CompileOptions& o, uint64_t seed) {
  const Signature sb = signature(t.backward, hash_combine(seed, 0xbacc));
  Bindings b;
  b.traces[0] = &t.forward;
  b.traces[1] = &t.backward;
  std::lock_guard<std::mutex> lock(fp.mu);
  std::vector<std::shared_ptr<BackwardPlan>>& variants = fp.backward[sb.hash];
  for (const auto& v : variants)
    if (v->profile.matches(sb.sizes) && plan_guards_hold(v->plan, b)) {
      ++counters().cache_hits;
      return v;
    }
  auto bp = std::make_shared<BackwardPlan>();
  if (variants.empty() || !o.automatic_dynamic) {
    bp->profile = initial_profile(sb, o.dynamic_dims, args);
  } else {
    bp->profile = variants.back()->profile;
    bp->profile.widen(sb.sizes);
    ++counters().recompilations;
  }
  const Graph joint = backward_with_recompute(t.forward, t.backward, fp.kept);
  PlanInput in;
  in.graph = &joint;
  in.fuse.enabled = o.fuse;
  in.signatures[0] = &fp.sig;
  in.profiles[0] = &fp.profile;
  in.signatures[1] = &sb;
  in.profiles[1] = &bp->profile;
  bp->plan = build_plan(in);
  bp->reads_outputs = reads_forward_outputs(bp->plan, t.forward);
  fp.backward_reads_outputs = fp.backward_reads_outputs || bp->reads_outputs;
  count_plan(bp->plan);
  log_plan("backward", o, joint, bp->plan, bp->profile);
  if (variants.size() >= kMaxVariants) variants.erase(variants.begin());
  variants.push_back(bp);
  return bp;
}

std::shared_ptr<ForwardPlan> forward_plan(TraceState& t, const std::vector<Tensor>& args, const CompileOptions& o,
                                          uint64_t seed) {
  Signature sig = signature(t.forward, seed);
  const Bindings b = forward_bindings(t, args);
  std::lock_guard<std::mutex> lock(cache().mu);
  std::vector<std::shared_ptr<ForwardPlan>>& variants = cache().entries[sig.hash];
  for (const auto& v : variants)
    if (v->profile.matches(sig.sizes) && plan_guards_hold(v->plan, b)) {
      ++counters().cache_hits;
      return v;
    }
  auto fp = std::make_shared<ForwardPlan>();
  if (variants.empty() || !o.automatic_dynamic) {
    fp->profile = initial_profile(sig, o.dynamic_dims, args);
  } else {
    fp->profile = variants.back()->profile;
    fp->profile.widen(sig.sizes);
    ++counters().recompilations;
  }
  fp->sig = std::move(sig);
  if (t.needs_grad) {
    if (!t.has_backward) trace_backward(t);
    fp->kept = choose_kept(t.forward, t.backward);
  }
  PlanInput in;
  in.graph = &t.forward;
  in.keep = fp->kept;
  in.fuse.enabled = o.fuse;
  in.signatures[0] = &fp->sig;
  in.profiles[0] = &fp->profile;
  fp->plan = build_plan(in);
  count_plan(fp->plan);
  counters().last_dynamic_sizes = fp->profile.num_dynamic();
  log_plan("forward", o, t.forward, fp->plan, fp->profile);
  if (t.needs_grad) backward_plan(*fp, t, args, o, seed);  // the first backward finds it built
  if (variants.size() >= kMaxVariants) variants.erase(variants.begin());
  variants.push_back(fp);
  return fp;
}

// The forward plan without the outputs: what it keeps for the backward and nothing only the outputs need.
const Plan& kept_only_plan(ForwardPlan& fp, const TraceState& t, const CompileOptions& o) {
  std::lock_guard<std::mutex> lock(fp.mu);
  if (!fp.kept_only) {
    Graph g = t.forward;
    g.outputs.clear();
    PlanInput in;
    in.graph = &g;
    in.keep = fp.kept;
    in.fuse.enabled = o.fuse;
    in.signatures[0] = &fp.sig;
    in.profiles[0] = &fp.profile;
    auto p = std::make_shared<Plan>(build_plan(in));
    count_plan(*p);
    log_plan("forward (kept values only)", o, g, *p, fp.profile);
    fp.kept_only = std::move(p);
  }
  return *fp.kept_only;
}

// One call, differentiable when the trace needs grad: its forward runs the forward plan and saves what
// the backward reads. (Without grad it is a Function too, so a checkpoint's first forward records the
// call its recompute makes.)
class CompiledCall : public autograd::Function {
 public:
  CompiledCall(std::shared_ptr<ForwardPlan> fp, std::shared_ptr<TraceState> t, std::vector<Tensor> args,
               const CompileOptions& o, uint64_t seed)
      : fp_(std::move(fp)), t_(std::move(t)), args_(std::move(args)), options_(o), seed_(seed) {}
  const char* name() const override { return "compiled"; }

  bool leave_outputs_uncomputed() override {
    if (!t_->needs_grad) return false;
    std::lock_guard<std::mutex> lock(fp_->mu);
    leave_outputs_ = !fp_->backward_reads_outputs;
    return leave_outputs_;
  }

  std::vector<Tensor> forward(const std::vector<Tensor>&) override {
    outputs_uncomputed_ = std::exchange(leave_outputs_, false);
    RunResult r = run_plan(outputs_uncomputed_ ? kept_only_plan(*fp_, *t_, options_) : fp_->plan,
                           forward_bindings(*t_, args_));
    if (outputs_uncomputed_)
      for (int v : t_->forward.outputs) {
        const TensorMeta& m = t_->forward.values[static_cast<size_t>(v)].meta;
        r.outputs.push_back(empty(m.shape, m.dtype, m.device));
      }
    versions_.clear();
    for (const Tensor& a : args_) versions_.push_back(a.storage() ? a.storage()->version() : 0);
    for (const Tensor& e : t_->externals) versions_.push_back(e.storage() ? e.storage()->version() : 0);
    std::vector<Tensor> saved = r.kept;
    saved.insert(saved.end(), r.outputs.begin(), r.outputs.end());
    save_for_backward(std::move(saved));
    return r.outputs;
  }

  std::vector<Tensor> backward(const std::vector<Tensor>& grads) override {
    KILN_CHECK(!autograd::grad_enabled(), "compile",
               "gradients of gradients (create_graph=true) through a compiled function are not supported");
    size_t k = 0;
    for (const Tensor& a : args_) check_version(a, k++, "an argument");
    for (size_t e = 0; e < t_->forward_externals; ++e) check_version(t_->externals[e], k++, "a captured tensor");
    if (!t_->has_backward) trace_backward(*t_);
    std::shared_ptr<BackwardPlan> bp = backward_plan(*fp_, *t_, args_, options_, seed_);
    if (outputs_uncomputed_ && bp->reads_outputs) {  // (a backward traced unlike the first): compute them now
      RunResult full = run_plan(fp_->plan, forward_bindings(*t_, args_));
      full.kept.insert(full.kept.end(), full.outputs.begin(), full.outputs.end());
      save_for_backward(std::move(full.kept));
      outputs_uncomputed_ = false;
    }
    const std::vector<Tensor>& saved = this->saved();
    Bindings b;
    b.traces[0] = &t_->forward;
    b.traces[1] = &t_->backward;
    b.input = [&](const Value& v) -> Tensor {
      switch (v.input.kind) {
        case InputKind::cotangent: {
          const Tensor& g = grads[static_cast<size_t>(t_->grad_outputs[static_cast<size_t>(v.input.index)])];
          return g.defined() ? g : zeros(v.meta.shape, v.meta.dtype, v.meta.device);
        }
        case InputKind::external: return t_->externals[static_cast<size_t>(v.input.index)];
        case InputKind::saved: return saved_value(v.input.index, saved);
        case InputKind::arg: break;
      }
      KILN_FAIL("compile", "a backward graph reads an argument directly");
    };
    RunResult r = run_plan(bp->plan, b);
    Counters& c = counters();
    c.last_backward_kernels = bp->plan.kernels;
    c.last_backward_groups = static_cast<int64_t>(bp->plan.fusion.groups.size());
    c.group_launches += c.last_backward_groups;
    c.fallback_ops += bp->plan.fallbacks;
    std::vector<Tensor> out(args_.size() + t_->forward_externals);  // per input: the arguments, then the captured tensors
    const size_t na = t_->grad_args.size();
    for (size_t i = 0; i < na; ++i) out[static_cast<size_t>(t_->grad_args[i])] = r.outputs[i];
    for (size_t m = 0; m < t_->grad_externals.size(); ++m)
      out[args_.size() + static_cast<size_t>(t_->grad_externals[m])] = r.outputs[na + m];
    return out;
  }

 private:
  void check_version(const Tensor& t, size_t k, const char* what) const {
    KILN_CHECK(!t.storage() || t.storage()->version() == versions_[k], "compile",
               "{} of a compiled function was modified in place after its forward; backward would read the new "
               "values",
               what);
  }

  Tensor saved_value(int s, const std::vector<Tensor>& saved) const {
    const Value& fv = t_->forward.values[static_cast<size_t>(s)];
    if (fv.producer < 0)
      return fv.input.kind == InputKind::arg ? args_[static_cast<size_t>(fv.input.index)]
                                             : t_->externals[static_cast<size_t>(fv.input.index)];
    const auto& kept = fp_->kept;
    if (auto it = std::find(kept.begin(), kept.end(), s); it != kept.end()) return saved[static_cast<size_t>(it - kept.begin())];
    const auto& outs = t_->forward.outputs;
    if (auto it = std::find(outs.begin(), outs.end(), s); it != outs.end())
      return saved[kept.size() + static_cast<size_t>(it - outs.begin())];
    KILN_FAIL("compile", "the backward reads forward value %{}, which was neither kept nor recomputed", s);
  }

  std::shared_ptr<ForwardPlan> fp_;
  std::shared_ptr<TraceState> t_;
  std::vector<Tensor> args_;
  CompileOptions options_;
  uint64_t seed_;
  std::vector<uint64_t> versions_;
  bool leave_outputs_ = false;        // the next forward runs the kept-only plan
  bool outputs_uncomputed_ = false;   // the last forward did
};

}  // namespace

std::vector<Tensor> CompiledFunction::run(const Fn& fn, const std::vector<Tensor>& inputs, const std::string& key) const {
  KILN_CHECK(s_ != nullptr, "compile", "calling an empty CompiledFunction");
  if (tracing()) return fn(inputs);  // inside an outer trace: let it see the ops
  Counters& c = counters();
  ++c.calls;
  const GeneratorState gen = default_generator().state();
  std::shared_ptr<TraceState> t;
  std::string why;
  try {
    t = trace_forward(fn, inputs);
    if (!t->pure) why = fmt::format("it writes in place ({})", t->impure_op);
  } catch (const Error& e) {
    why = e.what();
  }
  if (!why.empty()) {
    // Run eagerly; the trace drew random offsets from the default generator, which eager draws again.
    default_generator().set_state(gen);
    ++c.eager_calls;
    if (log_enabled()) log_text(fmt::format("'{}' runs eagerly: {}", s_->options.name, why), "");
    return fn(inputs);
  }
  const uint64_t seed = options_seed(s_->options, key, t->needs_grad);
  std::shared_ptr<ForwardPlan> fp = forward_plan(*t, inputs, s_->options, seed);
  c.last_forward_kernels = fp->plan.kernels;
  c.last_forward_groups = static_cast<int64_t>(fp->plan.fusion.groups.size());
  c.group_launches += c.last_forward_groups;
  c.fallback_ops += fp->plan.fallbacks;
  // Every captured tensor is an input, with grad or without (so a checkpoint's first forward, without
  // grad, records the call its recompute makes); gradients flow to those that require grad.
  std::vector<Tensor> fn_inputs = inputs;
  fn_inputs.insert(fn_inputs.end(), t->externals.begin(), t->externals.begin() + static_cast<std::ptrdiff_t>(t->forward_externals));
  auto call = std::make_shared<CompiledCall>(fp, t, inputs, s_->options, seed);
  return autograd::apply(call, fn_inputs);
}

std::vector<Tensor> CompiledFunction::operator()(const std::vector<Tensor>& inputs) const {
  KILN_CHECK(s_ && s_->fn, "compile", "this CompiledFunction has no function of its own; use run(fn, inputs)");
  return run(s_->fn, inputs);
}

const CompileOptions& CompiledFunction::options() const {
  KILN_CHECK(s_ != nullptr, "compile", "an empty CompiledFunction has no options");
  return s_->options;
}

CompiledFunction compile(Fn fn, CompileOptions options) {
  auto s = std::make_shared<CompiledFunction::State>();
  s->fn = std::move(fn);
  s->options = std::move(options);
  return CompiledFunction(std::move(s));
}

Stats stats() {
  const Counters& c = counters();
  Stats s;
  s.calls = c.calls;
  s.compilations = c.compilations;
  s.recompilations = c.recompilations;
  s.cache_hits = c.cache_hits;
  s.fused_groups = c.fused_groups;
  s.folded_adds = c.folded_adds;
  s.fallback_ops = c.fallback_ops;
  s.eager_calls = c.eager_calls;
  s.last_forward_kernels = c.last_forward_kernels;
  s.last_forward_groups = c.last_forward_groups;
  s.last_backward_kernels = c.last_backward_kernels;
  s.last_backward_groups = c.last_backward_groups;
  s.last_dynamic_sizes = c.last_dynamic_sizes;
  s.kernel_compiles = c.kernel_compiles;
  s.kernel_compile_ms = static_cast<double>(c.kernel_compile_us.load()) / 1e3;
  s.kernel_disk_hits = c.kernel_disk_hits;
  s.group_launches = c.group_launches;
  return s;
}

void reset_stats() {
  Counters& c = counters();
  for (std::atomic<int64_t>* a : {&c.calls, &c.compilations, &c.recompilations, &c.cache_hits, &c.fused_groups,
                                  &c.folded_adds, &c.fallback_ops, &c.eager_calls, &c.last_forward_kernels, &c.last_forward_groups,
                                  &c.last_backward_kernels, &c.last_backward_groups, &c.last_dynamic_sizes,
                                  &c.kernel_compiles, &c.kernel_compile_us, &c.kernel_disk_hits, &c.group_launches})
    a->store(0);
}

void clear_kernel_cache();  // compile/cuda_exec.cpp (a no-op without CUDA)

void clear_caches() {
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    cache().entries.clear();
  }
  clear_kernel_cache();
}

}  // namespace kiln::compile

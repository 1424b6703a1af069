// The checks every backend shares (shapes, dtypes, devices, contiguity of one rank's call) and the
// numbering of collectives; the backends see only calls that passed them.
#include "dist/process_group.h"

#include "core/ops.h"

namespace kiln::dist {

const char* reduce_op_name(ReduceOp op) { return op == ReduceOp::sum ? "sum" : "max"; }

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::all_gather: return "all_gather";
    case Collective::reduce_scatter: return "reduce_scatter";
    case Collective::all_reduce: return "all_reduce";
    case Collective::broadcast: return "broadcast";
    case Collective::barrier: return "barrier";
  }
  return "collective";
}

bool reducible(DType d) { return d == DType::f32 || d == DType::bf16 || d == DType::f64 || d == DType::i64; }

ProcessGroup::ProcessGroup(int rank, int size, std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), timeout_(timeout) {
  KILN_CHECK(size >= 1, "dist", "expected a world size >= 1, found {}", size);
  KILN_CHECK(rank >= 0 && rank < size, "dist", "expected a rank in [0, {}), found {}", size, rank);
  KILN_CHECK(timeout.count() > 0, "dist", "expected a positive timeout, found {} ms", timeout.count());
}

namespace {

std::string shape_str(const Shape& s) { return fmt::format("({})", fmt::join(s, ", ")); }

void check_defined(const Tensor& t, const char* op, const char* what) {
  KILN_CHECK(t.defined(), op, "expected a defined {} tensor", what);
}

void check_reducible(const Tensor& t, const char* op) {
  KILN_CHECK(reducible(t.dtype()), op, "expected f32, bf16, f64 or i64, found {} (other dtypes travel as raw bytes "
             "in all_gather and broadcast only)", dtype_name(t.dtype()));
}

// Dense in memory (a tensor without elements counts, whatever its strides).
bool dense(const Tensor& t) { return t.numel() == 0 || t.is_contiguous(); }

// The shape of `shard` stacked `n` times on dim 0 (a 0-d shard stacks into (n)).
Shape stacked(const Shape& shard, int n) {
  if (shard.empty()) return {n};
  Shape s = shard;
  s[0] *= n;
  return s;
}

}  // namespace

Work ProcessGroup::submit(Call call) {
  if (call.kind != Collective::barrier) {
    const Tensor& t = call.output.defined() ? call.output : call.input;
    KILN_CHECK(supports(t.device()), call.name(), "the {} backend does not take tensors on {}", backend(),
               t.device().str());
    KILN_CHECK(!t.requires_grad(), call.name(), "collectives write in place and record no gradient: pass a tensor "
               "that does not require grad (detach() it)");
  }
  call.seq = next_seq_++;
  if (call.output.defined() && call.output.storage()) call.output.storage()->bump_version();  // written in place
  return run(std::move(call));
}

Work ProcessGroup::all_gather(const Tensor& output, const Tensor& input) {
  check_defined(output, "all_gather", "output");
  check_defined(input, "all_gather", "input");
  KILN_CHECK(output.device() == input.device(), "all_gather", "expected input and output on one device, found {} and {}",
             input.device().str(), output.device().str());
  KILN_CHECK(output.dtype() == input.dtype(), "all_gather", "expected input and output of one dtype, found {} and {}",
             dtype_name(input.dtype()), dtype_name(output.dtype()));
  KILN_CHECK(output.shape() == stacked(input.shape(), size_), "all_gather",
             "expected an output of shape {} for an input of shape {} over {} ranks, found {}",
             shape_str(stacked(input.shape(), size_)), shape_str(input.shape()), size_, shape_str(output.shape()));
  KILN_CHECK(dense(output), "all_gather", "expected a contiguous output");
  Call c;
  c.kind = Collective::all_gather;
  c.input = dense(input) ? input : input.contiguous();
  c.output = output;
  return submit(std::move(c));
}

Work ProcessGroup::reduce_scatter(const Tensor& output, const Tensor& input) {
  check_defined(output, "reduce_scatter", "output");
  check_defined(input, "reduce_scatter", "input");
  KILN_CHECK(output.device() == input.device(), "reduce_scatter",
             "expected input and output on one device, found {} and {}", input.device().str(), output.device().str());
  KILN_CHECK(output.dtype() == input.dtype(), "reduce_scatter",
             "expected input and output of one dtype, found {} and {}", dtype_name(input.dtype()),
             dtype_name(output.dtype()));
  check_reducible(input, "reduce_scatter");
  KILN_CHECK(input.shape() == stacked(output.shape(), size_), "reduce_scatter",
             "expected an input of shape {} for an output of shape {} over {} ranks, found {}",
             shape_str(stacked(output.shape(), size_)), shape_str(output.shape()), size_, shape_str(input.shape()));
  KILN_CHECK(dense(output), "reduce_scatter", "expected a contiguous output");
  Call c;
  c.kind = Collective::reduce_scatter;
  c.input = dense(input) ? input : input.contiguous();
  c.output = output;
  return submit(std::move(c));
}

Work ProcessGroup::all_reduce(const Tensor& tensor, ReduceOp op) {
  check_defined(tensor, "all_reduce", "");
  check_reducible(tensor, "all_reduce");
  KILN_CHECK(dense(tensor), "all_reduce", "expected a contiguous tensor (it is reduced in place)");
  Call c;
  c.kind = Collective::all_reduce;
  c.input = c.output = tensor;
  c.op = op;
  return submit(std::move(c));
}

Work ProcessGroup::broadcast(const Tensor& tensor, int root) {
  check_defined(tensor, "broadcast", "");
  KILN_CHECK(root >= 0 && root < size_, "broadcast", "expected a root in [0, {}), found {}", size_, root);
  KILN_CHECK(dense(tensor), "broadcast", "expected a contiguous tensor (it is written in place)");
  Call c;
  c.kind = Collective::broadcast;
  c.input = c.output = tensor;
  c.root = root;
  return submit(std::move(c));
}

Work ProcessGroup::barrier() {
  Call c;
  c.kind = Collective::barrier;
  return submit(std::move(c));
}

}  // namespace kiln::dist

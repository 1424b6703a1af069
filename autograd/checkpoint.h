// Activation checkpointing: run `fn` without keeping its activations, and recompute them in
// backward. Pass every tensor that needs a gradient and is not a leaf (parameters may be captured
// by the closure). The default generator's state is restored for the recompute, so dropout inside
// `fn` draws the same mask twice.
//
// `save` (selective checkpointing): the outputs of the ops it picks (attention, say) are kept from
// the first forward, and the recompute takes them instead of running those ops again (an op is
// matched by its type, attributes and input shapes, in order; where the recompute differs, it runs
// the op).
//
// The recompute leaves out the ops whose outputs nothing reads: neither an op that runs nor a
// backward (Primitive::vjp_needs_inputs / vjp_needs_outputs, Function::backward_reads_input /
// backward_reads_outputs). A decoder layer's last GEMM (or its MLP in pieces, which checkpoint_chunks
// runs again in its own backward), whose output only carries the gradient back, is not run again.
// Tensors of the right shape, left uncomputed, stand for those outputs; a custom Function that must
// run but whose outputs nothing reads may leave them uncomputed too (Function::leave_outputs_uncomputed:
// a compiled layer runs its plan less down_proj). The data flow comes from the first forward's record
// of the calls fn makes itself; where the recompute departs from it (another call, an in-place write)
// or a running op reads a left-out output, the left-out ops run then. KILN_CHECKPOINT_RECOMPUTE_ALL=1
// runs every op.
//
// With `offload`, the inputs (and saved outputs) wait in host memory instead of on the device
// (core/offload.h): the copies down overlap the forward, and when an offloaded checkpoint's backward
// starts it fetches its own tensors and starts bringing back those of the offloaded checkpoint made
// just before it in forward (on this thread), so a stack of layers overlaps each copy back with the
// layer above's backward.
#pragma once
#include <functional>
#include <vector>

#include "core/primitive.h"
#include "core/tensor.h"

namespace kiln::autograd {

using CheckpointFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

struct CheckpointOptions {
  bool offload = false;  // keep the inputs (and saved outputs) in pinned host memory until backward
  std::function<bool(const Primitive&)> save;  // ops whose outputs the recompute reuses (none if empty)
  bool keep_marked = false;  // the tensors fn marks with keep_for_recompute are kept too
};

std::vector<Tensor> checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs, CheckpointOptions options = {});

// Marks `t`, just computed by an op or a custom Function, as one a checkpoint with
// CheckpointOptions::keep_marked keeps from its first forward (offloaded with the rest), so its recompute
// takes it instead of computing it and what only it needed (a Function's own ops are left uncomputed):
// for values costly to compute and cheap to keep (a decoder layer's q, k, v and the residual stream after
// attention). Elsewhere it does nothing.
void keep_for_recompute(const Tensor& t);

// A root for backward that holds `t`'s node and metadata but not its data (backward reads only those),
// so the data can be freed before backward runs; a leaf (an input returned as is) stays itself, as its
// gradient accumulates into it.
Tensor without_data(const Tensor& t);

// `fn` applied to `x` in pieces of `chunk` along `dim`, keeping only `x` for backward: the same
// result as fn(x) where fn treats positions along `dim` independently and keeps a piece's shape (a
// per-token MLP, a norm, a residual add). Forward writes each piece's output into one tensor;
// backward runs each piece again with grad (the generator's state replayed, as checkpoint does) and
// writes its input gradient into one tensor, so no piece's activations outlive it and no full-size
// gradient is made per piece; each piece's recompute leaves out what the first piece of its size
// (recorded in forward) showed nothing reads. Parameters `fn` captures get their gradients as usual.
Tensor checkpoint_chunks(std::function<Tensor(const Tensor&)> fn, const Tensor& x, int64_t dim, int64_t chunk);

}  // namespace kiln::autograd

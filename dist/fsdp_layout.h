// The memory layout of one fully_shard unit: each tensor's rows split over the ranks on dim 0 (padded
// to a multiple of the world size), a rank's shards packed into one flat byte buffer (trainable ones
// first), and the copies between that layout, the gathered bytes and the gradients' reduce buffer.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace kiln::dist {

// One parameter or buffer of a unit.
struct FsdpTensor {
  std::string name;          // dotted path below the unit's module
  Tensor tensor;             // the module's own handle: its impl is re-pointed, never replaced
  bool parameter = false;
  bool trainable = false;    // a parameter that requires grad
  bool replicated = false;   // whole on every rank: no gather; a trainable one's gradient is all-reduced
  Shape shape;               // the full shape
  DType dtype = DType::f32;
  int64_t rows = 1;          // shape[0] (1 for a 0-d tensor)
  int64_t row_numel = 1;     // elements per row
  int64_t shard_rows = 1;    // ceil(rows / world): rows every rank holds, zero rows padding the last ones
  size_t shard_offset = 0;   // bytes: this rank's shard in the flat shard buffer (16-aligned)
  int64_t grad_offset = 0;   // elements: the gradient shard in a rank's segment of the reduce buffer
                             // (sharded), or in the all-reduce buffer (replicated)
  Tensor shard;              // (shard_rows, rest...): this rank's rows, a view of the flat buffer; the
                             // full tensor when replicated
  Tensor full;               // while gathered: the full tensor (its own storage)
  uint64_t full_version = 0; // the storage version the last full tensor had (see unpack_gathered)
  Tensor grad;               // this rank's accumulated gradient (shard shape), stashed while in use

  size_t shard_nbytes() const { return static_cast<size_t>(shard_rows * row_numel) * itemsize(dtype); }
  int64_t shard_numel() const { return shard_rows * row_numel; }
  Shape shard_shape() const;  // (shard_rows, rest...)
};

// Sizes of a unit's buffers, per rank.
struct FsdpSizes {
  size_t shard_bytes = 0;      // the flat shard buffer (every sharded tensor)
  size_t trainable_bytes = 0;  // its prefix holding the trainable ones
  int64_t grad_numel = 0;      // a rank's segment of the reduce-scatter buffer (trainable, sharded)
  int64_t replicated_grad_numel = 0;  // the all-reduce buffer (trainable, replicated)
};

// Fills every tensor's shape fields and offsets for `world` ranks; 0-d tensors and those with fewer
// than `replicate_below` elements stay replicated. Trainable tensors come first in the flat buffer.
FsdpSizes plan_layout(std::vector<FsdpTensor>& tensors, int world, int64_t replicate_below);

// A tensor of `dtype` and contiguous `shape` viewing `bytes` (a u8 tensor) from `byte_offset` on.
Tensor typed_view(const Tensor& bytes, size_t byte_offset, const Shape& shape, DType dtype);

// Copies rank `rank`'s rows of `full` (the tensor's full shape) into t.shard, zeroing the padding.
void copy_rows_to_shard(const FsdpTensor& t, const Tensor& full, int rank);
// The full tensor of `t` from a gather buffer `gathered` (u8 (world * segment)): rank r's bytes of it
// sit at [r * segment + t.shard_offset, + shard_nbytes). A fresh storage, whose version is brought up
// to t.full_version so that autograd's check on tensors saved in forward passes after a re-gather (the
// bytes are the same).
Tensor unpack_gathered(const FsdpTensor& t, const Tensor& gathered, size_t segment, int world);
// Copies the gradient `grad` (the full shape) into a reduce-scatter buffer `buffer` ((world * segment)
// of the reduce dtype, zero-initialised so the padding rows stay 0): rank r's rows go to
// [r * segment + t.grad_offset, ...), converted to the buffer's dtype.
void pack_gradient(const FsdpTensor& t, const Tensor& grad, const Tensor& buffer, int64_t segment, int world);
// The full tensor rebuilt from every rank's shard (each (shard_rows, rest...)), padding dropped.
Tensor join_shards(const std::vector<Tensor>& shards, const Shape& shape);
// Rows [rank * shard_rows, ...) of `full` as a (shard_rows, rest...) tensor, zero padded.
Tensor take_shard(const Tensor& full, int64_t shard_rows, int rank);

}  // namespace kiln::dist

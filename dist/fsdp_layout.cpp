// fully_shard's layout arithmetic and its copies, all written with kiln ops (so they run on the CPU and
// on CUDA, on the caller's current stream): shard rows, gathered bytes -> full tensors (as words of up to
// 8 bytes, never through a float cast), gradients -> the reduce-scatter buffer.
#include "dist/fsdp_layout.h"

#include <algorithm>

#include "core/ops.h"

namespace kiln::dist {
namespace {

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// The widest integer word (8, 4 or 1 bytes) that divides both sizes: gathered bytes move as words.
DType word_for(size_t a, size_t b) {
  if (a % 8 == 0 && b % 8 == 0) return DType::i64;
  if (a % 4 == 0 && b % 4 == 0) return DType::i32;
  return DType::u8;
}

}  // namespace

Shape FsdpTensor::shard_shape() const {
  Shape s = shape;
  if (s.empty()) return s;
  s[0] = shard_rows;
  return s;
}

FsdpSizes plan_layout(std::vector<FsdpTensor>& tensors, int world, int64_t replicate_below) {
  KILN_CHECK(world >= 1, "fully_shard", "expected a world size >= 1, found {}", world);
  for (FsdpTensor& t : tensors) {
    t.shape = t.tensor.shape();
    t.dtype = t.tensor.dtype();
    t.rows = t.shape.empty() ? 1 : t.shape[0];
    t.row_numel = 1;
    for (size_t d = 1; d < t.shape.size(); ++d) t.row_numel *= t.shape[d];
    t.replicated = t.shape.empty() || t.rows == 0 || t.tensor.numel() < replicate_below;
    t.shard_rows = t.replicated ? t.rows : (t.rows + world - 1) / world;
  }
  FsdpSizes sizes;
  // Trainable tensors first: the checkpoint and adapter gathers move only that prefix.
  for (bool trainable : {true, false}) {
    for (FsdpTensor& t : tensors) {
      if (t.replicated || t.trainable != trainable) continue;
      t.shard_offset = sizes.shard_bytes;
      sizes.shard_bytes += align16(t.shard_nbytes());
      if (trainable) {
        t.grad_offset = sizes.grad_numel;
        sizes.grad_numel += (t.shard_numel() + 3) / 4 * 4;  // 16-byte aligned for f32
      }
    }
    if (trainable) sizes.trainable_bytes = sizes.shard_bytes;
  }
  for (FsdpTensor& t : tensors) {
    if (!t.replicated || !t.trainable) continue;
    t.grad_offset = sizes.replicated_grad_numel;
    sizes.replicated_grad_numel += t.tensor.numel();
  }
  return sizes;
}

Tensor typed_view(const Tensor& bytes, size_t byte_offset, const Shape& shape, DType dtype) {
  KILN_CHECK(bytes.dtype() == DType::u8 && bytes.is_contiguous(), "fully_shard",
             "expected a contiguous u8 byte buffer, found {} {}", dtype_name(bytes.dtype()), shape_str(bytes.shape()));
  const size_t item = itemsize(dtype);
  const size_t base = static_cast<size_t>(bytes.offset()) + byte_offset;
  const size_t need = static_cast<size_t>(kiln::numel(shape)) * item;
  KILN_CHECK(base % item == 0, "fully_shard", "expected a byte offset aligned to {} bytes for {}, found {}", item,
             dtype_name(dtype), base);
  KILN_CHECK(byte_offset + need <= bytes.nbytes(), "fully_shard",
             "expected a view of {} bytes at {} inside a buffer of {} bytes", need, byte_offset, bytes.nbytes());
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = bytes.storage();
  impl->offset = static_cast<int64_t>(base / item);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  impl->device = bytes.device();
  return Tensor(impl);
}

void copy_rows_to_shard(const FsdpTensor& t, const Tensor& full, int rank) {
  if (t.replicated) return;
  const int64_t start = static_cast<int64_t>(rank) * t.shard_rows;
  const int64_t n = std::clamp<int64_t>(t.rows - start, 0, t.shard_rows);
  if (n < t.shard_rows) fill_(t.shard, 0.0);
  if (n > 0) copy_(narrow(t.shard, 0, 0, n), narrow(full, 0, start, n));
}

Tensor unpack_gathered(const FsdpTensor& t, const Tensor& gathered, size_t segment, int world) {
  const size_t nb = t.shard_nbytes();
  const DType word = word_for(nb, segment);
  const auto w = static_cast<int64_t>(itemsize(word));
  const int64_t cols = static_cast<int64_t>(nb) / w, seg = static_cast<int64_t>(segment) / w;
  Tensor bytes = empty({static_cast<int64_t>(nb) * world}, DType::u8, gathered.device());  // (world * shard bytes)
  Tensor dst = typed_view(bytes, 0, {world, cols}, word);                                  // (world, shard words)
  Tensor src = narrow(typed_view(gathered, 0, {world, seg}, word), 1,
                      static_cast<int64_t>(t.shard_offset) / w, cols);                      // (world, shard words)
  copy_(dst, src);
  while (bytes.storage()->version() < t.full_version) bytes.storage()->bump_version();
  return typed_view(bytes, 0, t.shape, t.dtype);
}

void pack_gradient(const FsdpTensor& t, const Tensor& grad, const Tensor& buffer, int64_t segment, int world) {
  KILN_CHECK(grad.shape() == t.shape, "fully_shard", "{}: expected a gradient of shape {}, found {}", t.name,
             shape_str(t.shape), shape_str(grad.shape()));
  const int64_t s = t.shard_rows, rn = t.row_numel;
  Tensor g = reshape(grad, {t.rows, rn});          // (rows, row_numel)
  Tensor buf = view(buffer, {world, segment});     // (world, segment)
  const int64_t full = std::min<int64_t>(t.rows / s, world);  // ranks whose shard is all real rows
  if (full > 0)
    copy_(narrow(narrow(buf, 0, 0, full), 1, t.grad_offset, s * rn), reshape(narrow(g, 0, 0, full * s), {full, s * rn}));
  const int64_t rest = t.rows - full * s;
  if (rest > 0) copy_(narrow(select(buf, 0, full), 0, t.grad_offset, rest * rn), reshape(narrow(g, 0, full * s, rest), {rest * rn}));
}

Tensor join_shards(const std::vector<Tensor>& shards, const Shape& shape) {
  KILN_CHECK(!shards.empty() && !shape.empty(), "fully_shard", "expected shards of a tensor with at least one dim");
  return contiguous(narrow(cat(shards, 0), 0, 0, shape[0]));
}

Tensor take_shard(const Tensor& full, int64_t shard_rows, int rank) {
  Shape s = full.shape();
  s[0] = shard_rows;
  Tensor out = zeros(s, full.dtype(), full.device());
  const int64_t start = static_cast<int64_t>(rank) * shard_rows;
  const int64_t n = std::clamp<int64_t>(full.size(0) - start, 0, shard_rows);
  if (n > 0) copy_(narrow(out, 0, 0, n), narrow(full, 0, start, n));
  return out;
}

}  // namespace kiln::dist

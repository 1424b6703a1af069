// CUDA kernels of prim::Copy (host->device, device->host, device->device on one or two GPUs, casts,
// broadcast and strided operands on both sides), Fill, Cat and SliceBackward. Dense same-dtype
// copies are cudaMemcpyAsync; host<->device copies of strided or casting operands stage through a
// contiguous buffer so only the source's own elements cross the bus. D2H waits for its stream.
#include <cuda_runtime_api.h>

#include <cstring>

#include "core/cpu/copy.h"
#include "core/cuda/check.h"
#include "core/cuda/copy.cuh"
#include "core/registry.h"
#include "core/cuda/runtime.h"
#include "core/cuda/tensor_args.h"
#include "core/dispatch.h"
#include "core/ops/copy.h"

namespace kiln::cuda {
namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// dst = convert(src broadcast to dst's shape); both on one CUDA device, which is current.
void copy_on_device(const Tensor& dst, const Tensor& src, const char* op) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Strided<2> st = make_strided<2>(dst.shape(), {&dst, &src}, op);
  void* s = stream_of(dst);
  const bool dense = st.ndim == 1 && st.strides[0][0] == 1 && st.strides[1][0] == 1;
  if (dense && dst.dtype() == src.dtype()) {
    KILN_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), dst.nbytes(), cudaMemcpyDeviceToDevice, as_stream(s)), op);
  } else if (dense) {
    KILN_CUDA_CHECK(launch_copy_contiguous(dst.raw_data(), dst.dtype(), src.raw_data(), src.dtype(), n, s), op);
  } else {
    KILN_CUDA_CHECK(launch_copy_strided(dst.raw_data(), dst.dtype(), src.raw_data(), src.dtype(), st, n, s), op);
  }
}

bool same_layout(const Tensor& dst, const Tensor& src) {
  return dst.dtype() == src.dtype() && dst.shape() == src.shape() && dst.is_contiguous() && src.is_contiguous();
}

// src on the host: its elements go up once (made contiguous on the host if needed), then a device
// copy casts, broadcasts and scatters them into dst.
void copy_host_to_device(const Tensor& dst, const Tensor& src) {
  DeviceGuard guard(dst.device().index);
  cudaStream_t s = as_stream(stream_of(dst));
  Tensor host = src;
  if (!src.is_contiguous()) {
    host = empty(src.shape(), src.dtype(), kCPU);
    cpu::copy_into(host, src);
  }
  // Pageable sources: cudaMemcpyAsync returns once the bytes are staged, so `host` may go.
  if (same_layout(dst, host)) {
    KILN_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), host.raw_data(), dst.nbytes(), cudaMemcpyHostToDevice, s), "copy");
    return;
  }
  Tensor dev = empty(src.shape(), src.dtype(), dst.device());  // src's elements, contiguous
  KILN_CUDA_CHECK(cudaMemcpyAsync(dev.raw_data(), host.raw_data(), host.nbytes(), cudaMemcpyHostToDevice, s), "copy");
  copy_on_device(dst, dev, "copy");
}

// dst on the host: the device makes dst's values contiguous in dst's dtype, one transfer brings
// them down, and the stream is synchronised so the host can read them at once.
void copy_device_to_host(const Tensor& dst, const Tensor& src) {
  DeviceGuard guard(src.device().index);
  cudaStream_t s = as_stream(stream_of(src));
  Tensor dev = src;
  if (!same_layout(dst, src)) {
    dev = empty(dst.shape(), dst.dtype(), src.device());
    copy_on_device(dev, src, "copy");
  }
  Tensor host = dst.is_contiguous() ? dst : empty(dst.shape(), dst.dtype(), kCPU);
  KILN_CUDA_CHECK(cudaMemcpyAsync(host.raw_data(), dev.raw_data(), dst.nbytes(), cudaMemcpyDeviceToHost, s), "copy");
  KILN_CUDA_CHECK(cudaStreamSynchronize(s), "copy");
  if (!dst.is_contiguous()) cpu::copy_into(dst, host);
}

// Two GPUs: stage contiguous in dst's dtype on the source, one peer copy on the source's stream
// (ordered after the destination stream's earlier work and before its later work), then scatter.
void copy_between_devices(const Tensor& dst, const Tensor& src) {
  const int sd = src.device().index, dd = dst.device().index;
  Tensor a = src;
  if (!same_layout(dst, src)) {
    DeviceGuard guard(sd);
    a = empty(dst.shape(), dst.dtype(), src.device());
    copy_on_device(a, src, "copy");
  }
  Tensor b = dst;
  if (!dst.is_contiguous()) {
    DeviceGuard guard(dd);
    b = empty(dst.shape(), dst.dtype(), dst.device());
  }
  const Stream ss = current_stream(sd), ds = current_stream(dd);
  Event ready;
  ready.record(ds);
  ready.wait(ss);
  {
    DeviceGuard guard(sd);
    KILN_CUDA_CHECK(cudaMemcpyPeerAsync(b.raw_data(), dd, a.raw_data(), sd, dst.nbytes(), as_stream(ss.handle())), "copy");
  }
  Event done;
  done.record(ss);
  done.wait(ds);
  if (!dst.is_contiguous()) {
    DeviceGuard guard(dd);
    copy_on_device(dst, b, "copy");
  }
  // `a` was allocated on, and is freed on, the source stream; `b` is freed on the destination
  // stream, which already waits for the peer copy.
}

void copy_kernel(const prim::Copy&, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& src = in[0];
  const Tensor& dst = out[0];
  if (dst.numel() == 0) return;
  if (src.device().is_cpu()) {
    copy_host_to_device(dst, src);
  } else if (dst.device().is_cpu()) {
    copy_device_to_host(dst, src);
  } else if (src.device() == dst.device()) {
    DeviceGuard guard(dst.device().index);
    copy_on_device(dst, src, "copy");
  } else {
    copy_between_devices(dst, src);
  }
}

void fill_kernel(const prim::Fill& op, const std::vector<Tensor>&, std::vector<Tensor>& out) {
  const Tensor& t = out[0];
  const int64_t n = t.numel();
  if (n == 0) return;
  DeviceGuard guard(t.device().index);
  uint64_t bits = 0;  // the value in t's dtype, converted on the host exactly as the CPU kernel does
  visit_dtype(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T v = convert<T>(op.value());
    std::memcpy(&bits, static_cast<const void*>(&v), sizeof(T));
  });
  const Strided<1> st = make_strided<1>(t.shape(), {&t}, "fill");
  void* s = stream_of(t);
  if (bits == 0 && st.ndim == 1 && st.strides[0][0] == 1) {
    KILN_CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.nbytes(), as_stream(s)), "fill");
  } else {
    KILN_CUDA_CHECK(launch_fill(t.raw_data(), t.dtype(), bits, st, n, s), "fill");
  }
}

void cat_kernel(const prim::Cat& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& o = out[0];  // contiguous
  DeviceGuard guard(o.device().index);
  const size_t d = static_cast<size_t>(op.dim());
  int64_t at = 0;
  for (const Tensor& t : in) {
    Shape s = o.shape();
    s[d] = t.shape()[d];
    copy_on_device(cpu::raw_view(o, s, o.strides(), o.offset() + at * o.strides()[d]), t, "cat");
    at += t.shape()[d];
  }
}

void slice_backward_kernel(const prim::SliceBackward& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& o = out[0];  // contiguous, zero outside the slice
  DeviceGuard guard(o.device().index);
  if (o.numel() > 0)
    KILN_CUDA_CHECK(cudaMemsetAsync(o.raw_data(), 0, o.nbytes(), as_stream(stream_of(o))), "slice_backward");
  const Tensor& g = in[0];
  if (g.numel() == 0) return;
  const size_t d = static_cast<size_t>(op.dim());
  Shape st = o.strides();
  st[d] *= op.step();
  copy_on_device(cpu::raw_view(o, g.shape(), st, o.offset() + op.start() * o.strides()[d]), g, "slice_backward");
}

}  // namespace

KILN_REGISTER(cuda_copy_kernels) {
  register_kernel<prim::Copy>(DeviceType::cuda, &copy_kernel);
  register_kernel<prim::Fill>(DeviceType::cuda, &fill_kernel);
  register_kernel<prim::Cat>(DeviceType::cuda, &cat_kernel);
  register_kernel<prim::SliceBackward>(DeviceType::cuda, &slice_backward_kernel);
}

}  // namespace kiln::cuda

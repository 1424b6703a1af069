// The CUDA executor of fused groups: picks the kernel variant for this call's layouts (contiguous,
// scalar or strided inputs; 32-bit indexing when every offset fits), generates its source once,
// gets the cubin from NVRTC or the disk cache (vector widths too: see vector_width), loads it (cudaLibraryLoadData: no libcuda link
// needed) and launches it on the current stream with its words of arguments.
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <mutex>
#include <unordered_map>

#include "compile/codegen.h"
#include "compile/executor.h"
#include "compile/log.h"
#include "compile/cubin.h"
#include "core/cuda/runtime.h"

namespace kiln::compile {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  KILN_CHECK(e == cudaSuccess, "compile", "{} failed: {}", what, cudaGetErrorString(e));
}

struct Loaded {
  cudaLibrary_t library = nullptr;
  cudaKernel_t kernel = nullptr;
};

// Loaded kernels by architecture and source, and each program's kernels by variant.
struct KernelCache {
  std::mutex mu;
  std::unordered_map<std::string, Loaded> by_source;
  uint64_t generation = 0;  // bumped by clear_kernel_cache(): programs' own caches start over
};
KernelCache& cache() {
  static KernelCache c;
  return c;
}

struct ProgramKernels {
  uint64_t generation = 0;
  std::unordered_map<std::string, cudaKernel_t> by_variant;
};

std::string arch_of(int device) {
  static std::mutex mu;
  static std::unordered_map<int, std::string> archs;
  std::lock_guard<std::mutex> lock(mu);
  auto it = archs.find(device);
  if (it != archs.end()) return it->second;
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  return archs[device] = fmt::format("sm_{}{}", major, minor);
}

cudaKernel_t kernel_for(const Program& p, const Variant& v, const std::string& arch) {
  KernelCache& c = cache();
  const std::string vkey = arch + " " + v.key();
  std::lock_guard<std::mutex> lock(c.mu);
  auto pk = std::static_pointer_cast<ProgramKernels>(p.device_kernels);
  if (!pk || pk->generation != c.generation) {
    pk = std::make_shared<ProgramKernels>();
    pk->generation = c.generation;
    p.device_kernels = pk;
  }
  if (auto it = pk->by_variant.find(vkey); it != pk->by_variant.end()) return it->second;
  const std::string source = generate_cuda(p, v);
  const std::string skey = arch + "\n" + source;
  auto it = c.by_source.find(skey);
  if (it == c.by_source.end()) {
    if (log_enabled()) log_text(fmt::format("generated kernel ({}, {})", arch, v.key()), source);
    const std::string cubin = compile_cubin(source, arch);
    Loaded l;
    check_cuda(cudaLibraryLoadData(&l.library, cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0), "cudaLibraryLoadData");
    check_cuda(cudaLibraryGetKernel(&l.kernel, l.library, "kiln_fused"), "cudaLibraryGetKernel");
    it = c.by_source.emplace(skey, l).first;
  }
  pk->by_variant[vkey] = it->second.kernel;
  return it->second.kernel;
}

bool contiguous_over(const Shape& strides, const Shape& s) {
  int64_t expected = 1;
  for (size_t d = s.size(); d-- > 0;) {
    if (s[d] != 1 && strides[d] != expected) return false;
    expected *= s[d];
  }
  return true;
}

int64_t max_offset(const Shape& strides, const Shape& s) {
  int64_t m = 0;
  for (size_t d = 0; d < s.size(); ++d) m += (s[d] > 0 ? s[d] - 1 : 0) * strides[d];
  return m;
}

// The widest vector access (elements per thread, each access at most 16 bytes) every vector slot and
// output allows: `count` a multiple of it (the row length, or all elements), each address and each
// row step (`steps`, in elements) aligned to it.
struct VectorSlot {
  const void* ptr;
  size_t itemsize;
  std::vector<int64_t> steps;
};
int vector_width(const std::vector<VectorSlot>& slots, int64_t count) {
  size_t widest = 1;
  for (const VectorSlot& s : slots) widest = std::max(widest, s.itemsize);
  int v = static_cast<int>(std::min<size_t>(8, 16 / widest));
  auto fits = [&](int w) {
    if (count % w != 0) return false;
    for (const VectorSlot& s : slots) {
      if (reinterpret_cast<uintptr_t>(s.ptr) % (s.itemsize * static_cast<size_t>(w)) != 0) return false;
      for (int64_t st : s.steps)
        if (st % w != 0) return false;
    }
    return true;
  };
  while (v > 1 && !fits(v)) v /= 2;
  return v;
}

}  // namespace

void clear_kernel_cache() {
  std::lock_guard<std::mutex> lock(cache().mu);
  cache().by_source.clear();  // loaded libraries stay loaded: work queued earlier may still run them
  ++cache().generation;
}

void run_group_cuda(const Program& p, const GroupArgs& a) {
  const Shape& s = a.domain;
  const Device dev = a.outputs.at(0).device();
  cuda::DeviceGuard guard(dev.index);
  const int rank = static_cast<int>(s.size());
  const int64_t n = numel(s);
  const int64_t d = s.empty() ? 1 : s.back();
  const int64_t rows = d == 0 ? numel(Shape(s.begin(), s.end() - (s.empty() ? 0 : 1))) : n / d;
  if (p.row ? rows == 0 : n == 0) return;
  Variant v;
  v.rank = rank;
  std::vector<Shape> strides;
  int64_t reach = std::max<int64_t>(n, 1);
  for (size_t k = 0; k < p.inputs.size(); ++k) {
    strides.push_back(slot_strides(a.inputs[k], s, p.inputs[k].level));
    const Shape target = p.inputs[k].level == Level::row ? Shape(s.begin(), s.end() - 1) : s;
    reach = std::max(reach, max_offset(strides.back(), target) + 1);
    if (!p.row) {
      bool zero = true;
      for (int64_t st : strides.back()) zero = zero && st == 0;
      v.access.push_back(zero ? Access::scalar : contiguous_over(strides.back(), s) ? Access::contiguous : Access::strided);
    }
  }
  v.index32 = reach < (int64_t(1) << 31);
  std::vector<VectorSlot> vector_slots;  // the contiguous inputs and the outputs
  for (const Tensor& o : a.outputs) vector_slots.push_back({o.raw_data(), itemsize(o.dtype()), {}});
  if (p.row) {
    v.row_length = a.static_row_length;
    // element-level inputs read along the row with stride 1 take vector loads; their row steps must keep
    // the alignment (outputs are contiguous rows of d)
    v.access.assign(p.inputs.size(), Access::strided);
    for (size_t k = 0; k < p.inputs.size(); ++k) {
      const Shape& st = strides[k];
      if (p.inputs[k].level != Level::element || st.empty() || st.back() != 1) continue;
      v.access[k] = Access::contiguous;
      vector_slots.push_back({a.inputs[k].raw_data(), itemsize(a.inputs[k].dtype()), Shape(st.begin(), st.end() - 1)});
    }
    v.vec = vector_width(vector_slots, d);
    if (v.vec == 1) v.access.clear();
    v.block = 256;
    if (v.row_length >= 0)
      v.block = static_cast<int>(std::clamp<int64_t>((v.row_length / v.vec + 31) / 32 * 32, 32, 256));
  } else {
    bool strided_input = false;
    for (size_t k = 0; k < p.inputs.size(); ++k) {
      strided_input = strided_input || v.access[k] == Access::strided;
      if (v.access[k] == Access::contiguous)
        vector_slots.push_back({a.inputs[k].raw_data(), itemsize(a.inputs[k].dtype()), {}});
    }
    if (!strided_input) v.vec = vector_width(vector_slots, n);
  }
  const cudaKernel_t kernel = kernel_for(p, v, arch_of(dev.index));
  const ArgLayout l = arg_layout(p, v);
  KILN_CHECK(l.words * 8 <= 4096, "compile", "a fused group needs {} bytes of kernel arguments (at most 4096)", l.words * 8);
  std::vector<int64_t> w(static_cast<size_t>(l.words), 0);
  w[static_cast<size_t>(l.count)] = p.row ? rows : n;
  if (p.row) {
    w[static_cast<size_t>(l.row_length)] = d;
    for (int i = 0; i + 1 < rank; ++i) w[static_cast<size_t>(l.sizes + i)] = s[static_cast<size_t>(i)];
  } else {
    for (int i = 0; i < rank; ++i) w[static_cast<size_t>(l.sizes + i)] = s[static_cast<size_t>(i)];
  }
  for (size_t k = 0; k < p.inputs.size(); ++k) {
    w[static_cast<size_t>(l.input_ptr[k])] = reinterpret_cast<int64_t>(a.inputs[k].raw_data());
    if (l.input_strides[k] >= 0)
      for (size_t i = 0; i < strides[k].size(); ++i) w[static_cast<size_t>(l.input_strides[k]) + i] = strides[k][i];
  }
  for (size_t k = 0; k < p.outputs.size(); ++k)
    w[static_cast<size_t>(l.output_ptr[k])] = reinterpret_cast<int64_t>(a.outputs[k].raw_data());
  for (size_t k = 0; k < p.rng_nodes.size(); ++k) {
    w[static_cast<size_t>(l.rng[k])] = static_cast<int64_t>(a.rng[k].first);
    w[static_cast<size_t>(l.rng[k]) + 1] = static_cast<int64_t>(a.rng[k].second);
  }
  const int64_t work = p.row ? rows : (n / v.vec + v.block - 1) / v.block;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(work, int64_t(1) << 20)));
  void* args[] = {w.data()};
  auto stream = static_cast<cudaStream_t>(cuda::current_stream(dev.index).handle());
  check_cuda(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(static_cast<unsigned>(v.block)), args, 0, stream),
             "launching a fused group");
}

}  // namespace kiln::compile

// NF4 format in bitsandbytes' layout: the level and dynamic-code tables, the four primitives
// (NF4 quantise/dequantise, 8-bit blockwise quantise/dequantise), their CPU kernels, the public
// quantise/dequantise functions and the lazy kernel registration (core/ does not know quant/).
// bnb rounds every f32 product and sum separately; GCC would fuse a*b+c into an FMA in C++ mode.
#pragma GCC optimize("fp-contract=off")

#include "quant/nf4.h"
#include "quant/nf4_code.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <mutex>

#include "core/cpu/parallel.h"
#include "core/registry.h"
#include "core/dispatch.h"

namespace kiln::quant {

#ifdef KILN_WITH_CUDA
#endif

namespace {

// bnb's NF4 table (get_4bit_type("nf4")), exactly representable in f32.
constexpr std::array<float, 16> kLevels = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) exactly as torch
// evaluates it (linspace(0.1, 1, 2^i + 1) -> neighbour means -> times +-10^(i-6), plus 0 and 1, sorted),
// copied bit for bit from bnb's output (tests/data/nf4 holds it and the tests compare).
constexpr std::array<float, 256> kDynamicCode = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f,
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f,
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f,
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0x0.0p+0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1.0p+0f};

bool valid_blocksize(int64_t b) { return b >= 64 && b <= 4096 && (b & (b - 1)) == 0; }

// Flush-to-zero, as bnb's CUDA kernels (built with --use_fast_math) treat f32 denormals.
inline float ftz(float x) { return std::fabs(x) < FLT_MIN ? std::copysign(0.0f, x) : x; }

template <class T>
void nf4_quantize_cpu(const T* w, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  cpu::parallel_for(nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
      float amax = -FLT_MAX;
      for (int64_t i = begin; i < end; ++i) amax = std::fmax(amax, ftz(std::fabs(static_cast<float>(w[i]))));
      absmax[b] = amax;
      const float inv = 1.0f / amax;  // bnb's CUDA kernel: rcp.approx (see quant/nf4.h)
      // bytes [begin/2, ceil(end/2)); the padding value past n (odd n) quantises as 0
      for (int64_t i = begin; i < end; i += 2) {
        const float a = static_cast<float>(w[i]);
        const float c = i + 1 < end ? static_cast<float>(w[i + 1]) : 0.0f;
        const uint8_t hi = nf4_code(ftz(ftz(a) * inv)), lo = nf4_code(ftz(ftz(c) * inv));
        packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

void nf4_quantize_kernel(const prim::NF4Quantize& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  const Tensor& w = in[0];
  visit_dtype(w.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
      nf4_quantize_cpu(w.data_ptr<T>(), w.numel(), op.blocksize(), out[0].data_ptr<uint8_t>(),
                       out[1].data_ptr<float>());
    }
  });
}

void blockwise8_quantize_kernel(const prim::Blockwise8bitQuantize& op, const std::vector<Tensor>& in,
                                std::vector<Tensor>& out) {
  const float* x = in[0].data_ptr<float>();
  const float* code = in[1].data_ptr<float>();
  const int64_t n = in[0].numel(), bs = op.blocksize(), nblocks = (n + bs - 1) / bs;
  uint8_t* q = out[0].data_ptr<uint8_t>();
  float* absmax = out[1].data_ptr<float>();
  const float offset = op.offset();
  cpu::parallel_for(nblocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * bs, end = std::min(n, begin + bs);
      float amax = -FLT_MAX;
      for (int64_t i = begin; i < end; ++i) amax = std::fmax(amax, ftz(std::fabs(x[i] - offset)));
      absmax[b] = amax;
      const float inv = 1.0f / amax;
      for (int64_t i = begin; i < end; ++i) q[i] = dynamic_code_index(code, ftz(ftz(x[i] - offset) * inv));
    }
  });
}

void blockwise8_dequantize_kernel(const prim::Blockwise8bitDequantize& op, const std::vector<Tensor>& in,
                                  std::vector<Tensor>& out) {
  const uint8_t* q = in[0].data_ptr<uint8_t>();
  const float* absmax = in[1].data_ptr<float>();
  const float* code = in[2].data_ptr<float>();
  float* y = out[0].data_ptr<float>();
  const int64_t bs = op.blocksize();
  cpu::parallel_for(in[0].numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = code[q[i]] * absmax[i / bs];
  });
}

template <class T>
void nf4_dequantize_cpu(const prim::NF4Dequantize& op, const std::vector<Tensor>& in, T* y) {
  const uint8_t* packed = in[0].data_ptr<uint8_t>();
  const int64_t n = numel(op.shape()), bs = op.blocksize(), nblocks = (n + bs - 1) / bs;
  const float* absmax_f32 = op.double_quant() ? nullptr : in[1].data_ptr<float>();
  const uint8_t* absmax_u8 = op.double_quant() ? in[1].data_ptr<uint8_t>() : nullptr;
  const float* nested = op.double_quant() ? in[2].data_ptr<float>() : nullptr;
  const float* code = op.double_quant() ? in[3].data_ptr<float>() : nullptr;
  const float offset = op.offset();
  const int64_t nbs = op.nested_blocksize();
  cpu::parallel_for(nblocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float scale;
      if (absmax_u8 != nullptr) {
        const float decoded = code[absmax_u8[b]] * nested[b / nbs];  // two roundings, as bnb
        scale = decoded + offset;
      } else {
        scale = absmax_f32[b];
      }
      const int64_t end = std::min(n, (b + 1) * bs);
      for (int64_t i = b * bs; i < end; ++i) {
        const uint8_t byte = packed[i / 2];
        const float v = kLevels[(i & 1) ? (byte & 0x0f) : (byte >> 4)] * scale;
        y[i] = convert<T>(v);
      }
    }
  });
}

void nf4_dequantize_kernel(const prim::NF4Dequantize& op, const std::vector<Tensor>& in, std::vector<Tensor>& out) {
  switch (op.out_dtype()) {
    case DType::f32: nf4_dequantize_cpu(op, in, out[0].data_ptr<float>()); break;
    case DType::bf16: nf4_dequantize_cpu(op, in, out[0].data_ptr<bf16>()); break;
    case DType::f16: nf4_dequantize_cpu(op, in, out[0].data_ptr<f16>()); break;
    default: KILN_FAIL("nf4_dequantize", "output dtype must be bf16, f16 or f32, found {}", dtype_name(op.out_dtype()));
  }
}

void check_1d_contiguous(const Tensor& t, DType dt, const char* op, const char* what) {
  KILN_CHECK(t.defined(), op, "{} is undefined", what);
  KILN_CHECK(t.dtype() == dt, op, "{} must be {}, found {}", what, dtype_name(dt), dtype_name(t.dtype()));
  KILN_CHECK(t.is_contiguous(), op, "{} must be contiguous", what);
}

}  // namespace

const std::array<float, 16>& nf4_levels() { return kLevels; }

const std::array<float, 15>& nf4_midpoints() {
  static const std::array<float, 15> mids = [] {
    std::array<float, 15> m{};
    for (size_t i = 0; i < 15; ++i) m[i] = static_cast<float>((static_cast<double>(kLevels[i]) + kLevels[i + 1]) / 2.0);
    return m;
  }();
  return mids;
}

const std::array<float, 256>& dynamic_code() {
  return kDynamicCode;
}

Tensor nf4_levels_tensor(Device device) {
  return from_vector(std::vector<float>(kLevels.begin(), kLevels.end()), {16}, device);
}

Tensor dynamic_code_tensor(Device device) {
  const auto& c = dynamic_code();
  return from_vector(std::vector<float>(c.begin(), c.end()), {256}, device);
}

uint8_t nf4_code(float x) {
  uint8_t code = 0;
  for (float m : nf4_midpoints()) code = static_cast<uint8_t>(code + (x > m ? 1 : 0));
  return code;
}

uint8_t dynamic_code_index(const float* code, float x) { return detail::dynamic_code_search(code, x); }

size_t NF4Weight::nbytes() const {
  size_t total = 0;
  for (const Tensor* t : {&packed, &absmax, &nested_absmax, &nested_code}) {
    if (t->defined()) total += t->nbytes();
  }
  return total;
}

void NF4Weight::validate(const char* op) const {
  KILN_CHECK(valid_blocksize(blocksize), op, "blocksize must be a power of two in [64, 4096], found {}", blocksize);
  KILN_CHECK(dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f32, op,
             "original dtype must be bf16, f16 or f32, found {}", dtype_name(dtype));
  const int64_t n = numel();
  KILN_CHECK(n > 0, op, "weight shape {} has no elements", fmt::join(shape, ", "));
  check_1d_contiguous(packed, DType::u8, op, "packed");
  KILN_CHECK(packed.numel() == (n + 1) / 2, op, "packed must hold {} bytes for {} weights, found {}", (n + 1) / 2, n,
             packed.numel());
  check_1d_contiguous(absmax, double_quant ? DType::u8 : DType::f32, op, "absmax");
  KILN_CHECK(absmax.numel() == num_blocks(), op, "absmax must hold {} entries ({} weights / blocks of {}), found {}",
             num_blocks(), n, blocksize, absmax.numel());
  KILN_CHECK(absmax.device() == packed.device(), op, "absmax is on {}, packed on {}", absmax.device().str(),
             packed.device().str());
  if (double_quant) {
    KILN_CHECK(nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0, op,
               "nested_blocksize must be a power of two, found {}", nested_blocksize);
    const int64_t nn = (num_blocks() + nested_blocksize - 1) / nested_blocksize;
    check_1d_contiguous(nested_absmax, DType::f32, op, "nested_absmax");
    KILN_CHECK(nested_absmax.numel() == nn, op, "nested_absmax must hold {} entries, found {}", nn,
               nested_absmax.numel());
    check_1d_contiguous(nested_code, DType::f32, op, "nested_code");
    KILN_CHECK(nested_code.numel() == 256, op, "nested_code must hold 256 entries, found {}", nested_code.numel());
    KILN_CHECK(nested_absmax.device() == packed.device() && nested_code.device() == packed.device(), op,
               "nested_absmax/nested_code must be on {} with packed", packed.device().str());
  }
}

KILN_REGISTER(cpu_nf4_kernels) {
  register_kernel<prim::NF4Quantize>(DeviceType::cpu, &nf4_quantize_kernel);
  register_kernel<prim::Blockwise8bitQuantize>(DeviceType::cpu, &blockwise8_quantize_kernel);
  register_kernel<prim::Blockwise8bitDequantize>(DeviceType::cpu, &blockwise8_dequantize_kernel);
  register_kernel<prim::NF4Dequantize>(DeviceType::cpu, &nf4_dequantize_kernel);
}

float absmax_offset(const Tensor& absmax) {
  KILN_CHECK(absmax.defined() && absmax.dtype() == DType::f32 && absmax.numel() > 0, "nf4_quantize",
             "absmax must be a non-empty f32 tensor");
  const double total = sum(cast(absmax, DType::f64)).item<double>();
  return static_cast<float>(total / static_cast<double>(absmax.numel()));
}

NestedAbsmax double_quantize_absmax(const Tensor& absmax, float offset, int64_t nested_blocksize, const Tensor& code) {
  KILN_CHECK(absmax.defined() && absmax.dtype() == DType::f32, "blockwise8_quantize", "absmax must be f32");
  KILN_CHECK(nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0, "blockwise8_quantize",
             "nested_blocksize must be a power of two, found {}", nested_blocksize);
  const Tensor c = code.defined() ? contiguous(code) : dynamic_code_tensor(absmax.device());
  auto outs = dispatch(std::make_shared<const prim::Blockwise8bitQuantize>(nested_blocksize, offset),
                       {contiguous(absmax.reshape({-1})), c});
  return {outs[0], outs[1]};
}

Tensor dequantize_blockwise_8bit(const Tensor& codes, const Tensor& absmax, const Tensor& code, int64_t blocksize) {
  return dispatch1(std::make_shared<const prim::Blockwise8bitDequantize>(blocksize),
                   {contiguous(codes), contiguous(absmax), contiguous(code)});
}

NF4Weight quantize_nf4(const Tensor& w, bool double_quant, int64_t blocksize) {
  KILN_CHECK(w.defined(), "nf4_quantize", "weight is undefined");
  NF4Weight q;
  q.shape = w.shape();
  q.dtype = w.dtype() == DType::f64 ? DType::f32 : w.dtype();  // bnb knows f32/bf16/f16: f64 goes through f32
  q.blocksize = blocksize;
  q.double_quant = double_quant;
  auto outs = dispatch(std::make_shared<const prim::NF4Quantize>(blocksize),
                       {contiguous(w.detach().to(q.dtype)).reshape({-1})});
  q.packed = outs[0];
  if (double_quant) {
    q.offset = absmax_offset(outs[1]);
    q.nested_code = dynamic_code_tensor(w.device());
    NestedAbsmax nested = double_quantize_absmax(outs[1], q.offset, kNestedBlockSize, q.nested_code);
    q.absmax = nested.codes;
    q.nested_absmax = nested.nested_absmax;
  } else {
    q.absmax = outs[1];
  }
  return q;
}

Tensor dequantize_nf4(const NF4Weight& q, DType out) {
  q.validate("nf4_dequantize");
  std::vector<Tensor> inputs = {q.packed, q.absmax};
  if (q.double_quant) {
    inputs.push_back(q.nested_absmax);
    inputs.push_back(q.nested_code);
  }
  return dispatch1(std::make_shared<const prim::NF4Dequantize>(q.shape, out, q.blocksize, q.nested_blocksize, q.offset,
                                                                q.double_quant),
                   inputs);
}

Tensor dequantize_absmax(const NF4Weight& q) {
  q.validate("nf4_dequantize");
  if (!q.double_quant) return q.absmax;
  return add(dequantize_blockwise_8bit(q.absmax, q.nested_absmax, q.nested_code, q.nested_blocksize),
             static_cast<double>(q.offset));
}

NF4Weight to_device(const NF4Weight& q, Device device) {
  NF4Weight r = q;
  for (Tensor* t : {&r.packed, &r.absmax, &r.nested_absmax, &r.nested_code}) {
    if (t->defined()) *t = kiln::to_device(*t, device);
  }
  return r;
}

}  // namespace kiln::quant

namespace kiln::prim {

std::vector<TensorMeta> NF4Quantize::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 1, name(), "expected 1 input, found {}", in.size());
  const Tensor& w = in[0];
  KILN_CHECK(w.dtype() == DType::f32 || w.dtype() == DType::bf16 || w.dtype() == DType::f16, name(),
             "weight must be f32, bf16 or f16, found {}", dtype_name(w.dtype()));
  KILN_CHECK(w.is_contiguous(), name(), "weight must be contiguous");
  KILN_CHECK(w.numel() > 0, name(), "weight has no elements");
  KILN_CHECK(quant::valid_blocksize(blocksize_), name(), "blocksize must be a power of two in [64, 4096], found {}",
             blocksize_);
  const int64_t n = w.numel();
  return {{{(n + 1) / 2}, DType::u8, w.device()}, {{(n + blocksize_ - 1) / blocksize_}, DType::f32, w.device()}};
}

std::vector<TensorMeta> Blockwise8bitQuantize::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 2, name(), "expected 2 inputs (x, code), found {}", in.size());
  quant::check_1d_contiguous(in[0], DType::f32, name(), "x");
  quant::check_1d_contiguous(in[1], DType::f32, name(), "code");
  KILN_CHECK(in[1].numel() == 256, name(), "code must hold 256 entries, found {}", in[1].numel());
  KILN_CHECK(in[0].numel() > 0, name(), "x has no elements");
  KILN_CHECK(blocksize_ > 0, name(), "blocksize must be positive, found {}", blocksize_);
  const int64_t n = in[0].numel();
  return {{{n}, DType::u8, in[0].device()}, {{(n + blocksize_ - 1) / blocksize_}, DType::f32, in[0].device()}};
}

std::vector<TensorMeta> Blockwise8bitDequantize::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == 3, name(), "expected 3 inputs (codes, absmax, code), found {}", in.size());
  quant::check_1d_contiguous(in[0], DType::u8, name(), "codes");
  quant::check_1d_contiguous(in[1], DType::f32, name(), "absmax");
  quant::check_1d_contiguous(in[2], DType::f32, name(), "code");
  KILN_CHECK(blocksize_ > 0, name(), "blocksize must be positive, found {}", blocksize_);
  const int64_t n = in[0].numel();
  KILN_CHECK(in[1].numel() == (n + blocksize_ - 1) / blocksize_, name(),
             "absmax must hold {} entries for {} codes in blocks of {}, found {}", (n + blocksize_ - 1) / blocksize_,
             n, blocksize_, in[1].numel());
  KILN_CHECK(in[2].numel() == 256, name(), "code must hold 256 entries, found {}", in[2].numel());
  return {{{n}, DType::f32, in[0].device()}};
}

std::vector<TensorMeta> NF4Dequantize::infer(const std::vector<Tensor>& in) const {
  KILN_CHECK(in.size() == (double_quant_ ? 4u : 2u), name(), "expected {} inputs, found {}", double_quant_ ? 4 : 2,
             in.size());
  KILN_CHECK(out_ == DType::bf16 || out_ == DType::f16 || out_ == DType::f32, name(),
             "output dtype must be bf16, f16 or f32, found {}", dtype_name(out_));
  quant::NF4Weight q;
  q.packed = in[0];
  q.absmax = in[1];
  if (double_quant_) {
    q.nested_absmax = in[2];
    q.nested_code = in[3];
  }
  q.shape = shape_;
  q.blocksize = blocksize_;
  q.nested_blocksize = nested_blocksize_;
  q.double_quant = double_quant_;
  q.validate(name());
  return {{shape_, out_, in[0].device()}};
}

}  // namespace kiln::prim

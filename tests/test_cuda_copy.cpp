// CUDA copy and creation families against the CPU: host<->device round trips of every dtype, casts
// between all pairs (bit-exact), strided/broadcast operands on either side of copy_, fill, cat,
// slice/cat/copy gradients, arange, and Philox rand/randn/randint/dropout_mask/dropout bit for bit.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "core/cuda/runtime.h"
#include "core/random.h"
#include "tests/helpers.h"

using namespace kiln;
using kiln::test::make_noncontiguous;
using kiln::test::random_tensor;
using kiln::test::require_close;
using kiln::test::require_equal;

namespace {

const Device kGPU{DeviceType::cuda, 0};
const DType kAll[] = {DType::f64, DType::f32, DType::bf16, DType::f16, DType::i64, DType::i32, DType::u8, DType::boolean};
const DType kFloats[] = {DType::f64, DType::f32, DType::bf16, DType::f16};
const std::vector<Shape> kShapes = {{}, {1}, {7}, {3, 5, 7}, {2, 1, 33, 4}, {1000003}, {0, 3}};

Tensor gpu(const Tensor& t) { return t.to(kGPU); }

// Two generators in the same state: one draws on the CPU, one on the GPU.
struct GenPair {
  Generator c, d;
  GenPair(uint64_t seed, uint64_t offset) : c(seed), d(seed) {
    c.set_state({seed, offset});
    d.set_state({seed, offset});
  }
};
Tensor host(const Tensor& t) { return t.to(kCPU); }

}  // namespace

TEST_CASE("host <-> device round trips keep every dtype's bits", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 1;
  for (DType dt : kAll) {
    for (const Shape& s : kShapes) {
      for (bool nc : {false, true}) {
        Tensor x = random_tensor(s, dt, seed++, nc);
        Tensor d = gpu(x);
        REQUIRE(d.device() == kGPU);
        REQUIRE(d.is_contiguous());
        require_equal(host(d), x);
        require_equal(host(make_noncontiguous(d)), x);  // strided D2H
      }
    }
  }
  // to_vector straight from the device
  Tensor v = gpu(from_vector<int32_t>({1, 2, 3, 4, 5, 6}, {2, 3}));
  REQUIRE(v.t().to_vector<int32_t>() == std::vector<int32_t>{1, 4, 2, 5, 3, 6});
}

TEST_CASE("casts between all dtype pairs match the CPU exactly", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 100;
  for (DType from : kAll) {
    for (DType to : kAll) {
      for (const Shape& s : {Shape{1}, Shape{37}, Shape{4, 129}, Shape{100001}}) {
        for (bool nc : {false, true}) {
          Tensor x = random_tensor(s, from, seed++, nc);
          Tensor cpu_out = cast(x, to);
          require_equal(host(cast(gpu(x), to)), cpu_out);                     // contiguous source on the device
          require_equal(host(cast(make_noncontiguous(gpu(x)), to)), cpu_out);  // strided source
          require_equal(cast(x, to).to(kGPU).to(kCPU), cpu_out);
          // casting on the way to and from the device
          Tensor up = empty(s, to, kGPU);
          up.copy_(x);
          require_equal(host(up), cpu_out);
          Tensor down = empty(s, to, kCPU);
          down.copy_(gpu(x));
          require_equal(down, cpu_out);
        }
      }
    }
  }
  // values that round: f32 -> bf16 / f16 ties, large ints -> f32 through double
  Tensor r = from_vector<float>({1.00390625f, 1.01171875f, 65519.0f, 65520.0f, -3.7f, 300.2f, 1e-8f}, {7});
  for (DType to : kAll) require_equal(host(cast(gpu(r), to)), cast(r, to));
  Tensor big = from_vector<int64_t>({(int64_t{1} << 53) + 1, -(int64_t{1} << 40) - 3, 16777217}, {3});
  for (DType to : kAll) require_equal(host(cast(gpu(big), to)), cast(big, to));
}

TEST_CASE("copy_ handles strided and broadcast operands on both sides", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::i32, DType::boolean}) {
    Tensor src = random_tensor({6, 3}, dt, 7);
    // destination: a strided view (every other column of a transposed buffer)
    auto check_into_view = [&](const Device& dst_dev, const Tensor& s) {
      Tensor base_c = zeros({8, 6}, dt);
      Tensor base_d = zeros({8, 6}, dt, dst_dev);
      Tensor view_c = base_c.t().slice(1, 1, 7, 2);  // (6, 3), strides (1, 12)
      Tensor view_d = base_d.t().slice(1, 1, 7, 2);
      view_c.copy_(s.to(kCPU));
      view_d.copy_(s);
      require_equal(host(base_d), base_c);
    };
    check_into_view(kGPU, gpu(src));                     // D2D into a view
    check_into_view(kGPU, src);                          // H2D into a view
    check_into_view(kGPU, make_noncontiguous(gpu(src)));  // strided -> strided on the device
    check_into_view(kCPU, gpu(src));                     // D2H into a host view
    check_into_view(kCPU, make_noncontiguous(gpu(src)));

    // broadcast sources: (3,) and (6, 1) into (6, 3); expanded views; a 0-d scalar
    for (const Shape& bs : {Shape{3}, Shape{6, 1}, Shape{}}) {
      Tensor b = random_tensor(bs, dt, 11);
      Tensor want = empty({6, 3}, dt);
      want.copy_(b);
      Tensor got = empty({6, 3}, dt, kGPU);
      got.copy_(gpu(b));
      require_equal(host(got), want);
      got.copy_(b);  // broadcast H2D
      require_equal(host(got), want);
      Tensor hd = empty({6, 3}, dt);
      hd.copy_(gpu(b));  // broadcast D2H
      require_equal(hd, want);
    }
    Tensor e = random_tensor({1, 5}, dt, 12);
    require_equal(host(gpu(e).expand({4, 5}).contiguous()), e.expand({4, 5}).contiguous());
    require_equal(host(gpu(e.expand({4, 5}))), e.expand({4, 5}));  // H2D of an expanded view
  }
  // many dims, permuted
  Tensor x = random_tensor({2, 3, 4, 5, 6}, DType::f32, 13);
  Tensor p = x.permute({4, 2, 0, 3, 1});
  require_equal(host(gpu(x).permute({4, 2, 0, 3, 1}).contiguous()), p.contiguous());
  require_equal(host(gpu(p)), p);
}

TEST_CASE("transposing copies (tiled path) match the CPU in both directions, with casts", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 200;
  for (const Shape& s : {Shape{32, 32}, Shape{37, 45}, Shape{100, 1000}, Shape{3, 33, 65}, Shape{70000, 33}}) {
    for (DType from : {DType::f32, DType::bf16, DType::f64, DType::u8, DType::boolean}) {
      for (DType to : {DType::f32, DType::bf16, DType::f16, DType::i32}) {
        Tensor x = random_tensor(s, from, seed++);
        const int64_t nd = static_cast<int64_t>(s.size());
        Tensor xt = x.transpose(nd - 2, nd - 1);  // src contiguous along the dst's row dim
        Tensor want = cast(xt.contiguous(), to);
        Tensor got = empty(xt.shape(), to, kGPU);
        got.copy_(gpu(x).transpose(nd - 2, nd - 1));
        require_equal(host(got), want);
        // and the other way: a contiguous source written into a transposed view
        Tensor dst = empty(s, to, kGPU);
        dst.transpose(nd - 2, nd - 1).copy_(gpu(want));
        require_equal(host(dst), cast(x, to));
      }
    }
  }
}

TEST_CASE("fill on the device, contiguous and strided, every dtype", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kAll) {
    for (double v : {0.0, 1.0, -2.5, 3.75}) {
      for (const Shape& s : {Shape{}, Shape{1}, Shape{17}, Shape{3, 1001}, Shape{0}}) {
        require_equal(host(full(s, v, dt, kGPU)), full(s, v, dt));
      }
      Tensor base_c = zeros({10, 7}, dt), base_d = zeros({10, 7}, dt, kGPU);
      base_c.slice(0, 1, 10, 3).fill_(v);
      base_d.slice(0, 1, 10, 3).fill_(v);
      base_c.t().select(0, 2).fill_(v + 1);
      base_d.t().select(0, 2).fill_(v + 1);
      require_equal(host(base_d), base_c);
    }
  }
}

TEST_CASE("cat on the device matches the CPU", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  uint64_t seed = 300;
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64, DType::i64, DType::u8, DType::boolean}) {
    for (int64_t dim : {0, 1, 2}) {
      std::vector<Tensor> cs, ds;
      for (int64_t n : {3, 0, 1, 5}) {
        Shape s = {4, 6, 5};
        s[static_cast<size_t>(dim)] = n;
        Tensor t = random_tensor(s, dt, seed++, n % 2 == 1);
        cs.push_back(t);
        ds.push_back(gpu(t));
      }
      require_equal(host(cat(ds, dim)), cat(cs, dim));
    }
  }
}

TEST_CASE("gradients through slice, cat, cast and device moves on CUDA match the CPU", "[cuda][copy]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    Tensor x_c = random_tensor({9, 12}, dt, 400).set_requires_grad();
    Tensor x_d = gpu(x_c.detach()).set_requires_grad();
    Tensor g = random_tensor({9, 4}, dt, 401);
    x_c.slice(1, 1, 12, 3).backward(g);
    x_d.slice(1, 1, 12, 3).backward(gpu(g));
    REQUIRE(x_d.grad().device() == kGPU);
    require_equal(host(x_d.grad()), x_c.grad());

    // cat: gradient pieces are narrow views of the output gradient
    Tensor a_c = random_tensor({3, 5}, dt, 402).set_requires_grad(), b_c = random_tensor({2, 5}, dt, 403).set_requires_grad();
    Tensor a_d = gpu(a_c.detach()).set_requires_grad(), b_d = gpu(b_c.detach()).set_requires_grad();
    Tensor gc = random_tensor({5, 5}, dt, 404);
    cat({a_c, b_c}, 0).backward(gc);
    cat({a_d, b_d}, 0).backward(gpu(gc));
    require_equal(host(a_d.grad()), a_c.grad());
    require_equal(host(b_d.grad()), b_c.grad());

    // host leaf -> device -> cast: the gradient comes back to the host in the leaf's dtype
    Tensor h = random_tensor({4, 3}, dt, 405).set_requires_grad();
    Tensor y = cast(h.to(kGPU), DType::f32);
    Tensor gy = random_tensor({4, 3}, DType::f32, 406);
    y.backward(gpu(gy));
    REQUIRE(h.grad().device() == kCPU);
    require_equal(h.grad(), cast(gy, dt));
  }
}

TEST_CASE("arange on the device matches the CPU", "[cuda][copy][creation]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kAll) {
    if (dt == DType::boolean) continue;
    require_equal(host(arange(1000, dt, kGPU)), arange(1000, dt));
    require_close(host(arange(-3.0, 10.5, 0.7, dt, kGPU)), arange(-3.0, 10.5, 0.7, dt), 1e-6, 1e-6);
  }
  REQUIRE(arange(0, DType::f32, kGPU).numel() == 0);
}

TEST_CASE("Philox random ops on CUDA are bit-identical to the CPU", "[cuda][copy][creation]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const std::vector<Shape> shapes = {{1}, {3}, {4}, {5}, {7, 9}, {2, 3, 129}, {100003}};
  for (uint64_t seed : {uint64_t{0}, uint64_t{42}, uint64_t{0xdeadbeefcafe1234}}) {
    for (uint64_t offset : {uint64_t{0}, uint64_t{3}, uint64_t{1} << 33}) {
      for (const Shape& s : shapes) {
        INFO("seed " << seed << " offset " << offset << " shape " << shape_str(s));
        for (DType dt : kFloats) {
          GenPair g(seed, offset);
          require_equal(host(rand(s, dt, kGPU, &g.d)), rand(s, dt, kCPU, &g.c));
          Tensor nd = host(randn(s, dt, kGPU, &g.d)), nc = randn(s, dt, kCPU, &g.c);
          require_close(nd, nc, 1e-6, 1e-12);
        }
        for (DType dt : {DType::i64, DType::i32, DType::f32, DType::f64}) {
          GenPair g(seed, offset);
          require_equal(host(randint(-7, 1000, s, dt, kGPU, &g.d)), randint(-7, 1000, s, dt, kCPU, &g.c));
        }
        {
          GenPair g(seed, offset);
          require_equal(host(randint(0, 200, s, DType::u8, kGPU, &g.d)), randint(0, 200, s, DType::u8, kCPU, &g.c));
          require_equal(host(randint(-(int64_t{1} << 40), int64_t{1} << 41, s, DType::i64, kGPU, &g.d)),
                        randint(-(int64_t{1} << 40), int64_t{1} << 41, s, DType::i64, kCPU, &g.c));
        }
        for (double p : {0.0, 0.1, 0.5, 0.9, 1.0}) {
          GenPair g(seed, offset);
          require_equal(host(dropout_mask(s, p, kGPU, &g.d)), dropout_mask(s, p, kCPU, &g.c));
        }
        for (DType dt : kFloats) {
          for (double p : {0.1, 0.5, 1.0}) {
            for (bool nc : {false, true}) {
              GenPair g(seed, offset);
              Tensor x = random_tensor(s, dt, seed ^ offset ^ 77, nc);
              Tensor xd = nc ? make_noncontiguous(gpu(x)) : gpu(x);
              require_equal(host(dropout(xd, p, true, &g.d)), dropout(x, p, true, &g.c));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("dropout backward on CUDA reuses the mask like the CPU", "[cuda][copy][creation]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (DType dt : kFloats) {
    Generator gc(9), gd(9);
    Tensor x_c = random_tensor({33, 17}, dt, 500).set_requires_grad();
    Tensor x_d = gpu(x_c.detach()).set_requires_grad();
    Tensor g = random_tensor({33, 17}, dt, 501);
    Tensor y_c = dropout(x_c, 0.3, true, &gc);
    Tensor y_d = dropout(x_d, 0.3, true, &gd);
    require_equal(host(y_d), y_c);
    y_c.backward(g);
    y_d.backward(gpu(g));
    require_equal(host(x_d.grad()), x_c.grad());
  }
}

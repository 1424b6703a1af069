// matmul and the CPU GEMM: every dtype against a double-loop reference over odd, size-1, block-
// crossing, batched/broadcast, transposed, strided and offset operands; K == 0 and empty shapes;
// f64 finite-difference gradients (incl. broadcast batches); errors with their messages.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cmath>
#include <memory>
#include <vector>

#include "autograd/node.h"
#include "core/cpu/gemm.h"
#include "tests/helpers.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

struct Tol {
  DType dtype;
  double rtol, atol;
};
// bf16/f16 round the f32 sum once: about one half-ulp of the result (2^-8, 2^-11) relative.
const Tol kTols[] = {{DType::f64, 1e-11, 1e-11}, {DType::f32, 1e-4, 1e-4}, {DType::bf16, 1e-2, 1e-2},
                     {DType::f16, 2e-3, 2e-3}};

std::vector<double> values(const Tensor& t) { return cast(t, DType::f64).to_vector<double>(); }

// The broadcast of two batch shapes, computed independently of kiln's broadcast_shapes.
Shape broadcast_batch(const Shape& a, const Shape& b) {
  const size_t nd = std::max(a.size(), b.size());
  Shape out(nd, 1);
  for (size_t i = 0; i < nd; ++i) {
    const int64_t da = i + a.size() >= nd ? a[i + a.size() - nd] : 1;
    const int64_t db = i + b.size() >= nd ? b[i + b.size() - nd] : 1;
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Row-major index into a batch shape `s` (right-aligned with `full`) of the full batch index `idx`.
int64_t batch_index(const Shape& s, const Shape& full, const std::vector<int64_t>& idx) {
  int64_t flat = 0;
  const size_t lead = full.size() - s.size();
  for (size_t d = 0; d < s.size(); ++d) flat = flat * s[d] + (s[d] == 1 ? 0 : idx[lead + d]);
  return flat;
}

// a (..., M, K) @ b (..., K, N) in double with plain loops.
Tensor reference_matmul(const Tensor& a, const Tensor& b) {
  const Shape& as = a.shape();
  const Shape& bs = b.shape();
  const int64_t m = as[as.size() - 2], k = as.back(), n = bs.back();
  const Shape ab(as.begin(), as.end() - 2), bb(bs.begin(), bs.end() - 2);
  const Shape batch = broadcast_batch(ab, bb);
  const std::vector<double> av = values(a), bv = values(b);
  int64_t nbatch = 1;
  for (int64_t d : batch) nbatch *= d;
  std::vector<double> out(static_cast<size_t>(nbatch * m * n), 0.0);  // (batch..., M, N)
  std::vector<int64_t> idx(batch.size(), 0);
  for (int64_t bi = 0; bi < nbatch; ++bi) {
    int64_t rem = bi;
    for (size_t d = batch.size(); d-- > 0;) {
      idx[d] = rem % batch[d];
      rem /= batch[d];
    }
    const double* pa = av.data() + batch_index(ab, batch, idx) * m * k;
    const double* pb = bv.data() + batch_index(bb, batch, idx) * k * n;
    double* po = out.data() + bi * m * n;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += pa[i * k + p] * pb[p * n + j];
        po[i * n + j] = s;
      }
  }
  Shape os = batch;
  os.push_back(m);
  os.push_back(n);
  return from_vector<double>(out, os);
}

void check_against_reference(const Tensor& a, const Tensor& b, const Tol& tol) {
  Tensor out = matmul(a, b);
  Tensor ref = reference_matmul(a, b);
  INFO(dtype_name(a.dtype()) << " " << shape_str(a.shape()) << " @ " << shape_str(b.shape()));
  REQUIRE(out.dtype() == a.dtype());
  REQUIRE(out.shape() == ref.shape());
  REQUIRE(out.is_contiguous());
  test::require_close(cast(out, DType::f64), ref, tol.rtol, tol.atol);
}

struct MNK {
  int64_t m, n, k;
};

}  // namespace

TEST_CASE("matmul matches a double reference for odd, size-1 and block-crossing shapes", "[matmul]") {
  // 65x130x97 crosses the register tiles, 150x260 the M and K cache blocks, N = 2100 the N block.
  const MNK shapes[] = {{1, 1, 1},    {7, 5, 13},   {6, 16, 8},    {4, 3, 1},     {1, 9, 6},  {8, 1, 6},
                        {1, 1, 40},   {1, 37, 300}, {300, 1, 37},  {65, 97, 130}, {150, 40, 260},
                        {3, 2100, 8}, {13, 17, 519}};
  uint64_t seed = 1;
  for (const Tol& tol : kTols) {
    for (const MNK& s : shapes) {
      Tensor a = test::random_tensor({s.m, s.k}, tol.dtype, seed++);
      Tensor b = test::random_tensor({s.k, s.n}, tol.dtype, seed++);
      check_against_reference(a, b, tol);
    }
  }
}

TEST_CASE("matmul of a large product runs the parallel blocked path correctly", "[matmul]") {
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor a = test::random_tensor({203, 271}, dt, 11);
    Tensor b = test::random_tensor({271, 307}, dt, 12);
    check_against_reference(a, b, dt == DType::f32 ? kTols[1] : kTols[0]);
    check_against_reference(transpose(b, 0, 1), transpose(a, 0, 1), dt == DType::f32 ? kTols[1] : kTols[0]);
  }
}

TEST_CASE("matmul broadcasts batch dimensions", "[matmul]") {
  struct Case {
    Shape a, b, out;
  };
  const Case cases[] = {
      {{2, 1, 5, 7}, {3, 7, 4}, {2, 3, 5, 4}},   // both broadcast
      {{4, 6, 3}, {3, 5}, {4, 6, 5}},            // shared B: folds into one GEMM
      {{6, 3}, {4, 3, 5}, {4, 6, 5}},            // shared A
      {{2, 3, 4, 5}, {2, 3, 5, 6}, {2, 3, 4, 6}},  // no broadcast
      {{1, 5, 7}, {3, 7, 4}, {3, 5, 4}},         // size-1 batch dim
      {{3, 1, 2, 4}, {1, 4, 4, 1}, {3, 4, 2, 1}},  // N == 1 inside a batch
      {{2, 130, 130}, {2, 130, 129}, {2, 130, 129}},  // big enough to run the batch sequentially
      {{5, 1, 8}, {5, 8, 3}, {5, 1, 3}},         // M == 1 inside a batch
  };
  uint64_t seed = 100;
  for (const Tol& tol : kTols) {
    for (const Case& c : cases) {
      Tensor a = test::random_tensor(c.a, tol.dtype, seed++);
      Tensor b = test::random_tensor(c.b, tol.dtype, seed++);
      REQUIRE(matmul(a, b).shape() == c.out);
      check_against_reference(a, b, tol);
    }
  }
}

TEST_CASE("matmul reads transposed, strided and offset operands in place", "[matmul]") {
  uint64_t seed = 200;
  for (const Tol& tol : kTols) {
    const DType dt = tol.dtype;
    // transposed views (unit row stride): A^T @ B, A @ B^T, A^T @ B^T
    Tensor at = transpose(test::random_tensor({13, 7}, dt, seed++), 0, 1);   // (7, 13)
    Tensor bt = transpose(test::random_tensor({5, 13}, dt, seed++), 0, 1);   // (13, 5)
    Tensor a = test::random_tensor({7, 13}, dt, seed++);
    Tensor b = test::random_tensor({13, 5}, dt, seed++);
    check_against_reference(at, b, tol);
    check_against_reference(a, bt, tol);
    check_against_reference(at, bt, tol);
    // x (1, K) @ W^T and W @ x^T: the GEMV paths with a transposed matrix
    Tensor w = test::random_tensor({37, 70}, dt, seed++);  // (N, K)
    Tensor x = test::random_tensor({1, 70}, dt, seed++);
    check_against_reference(x, transpose(w, 0, 1), tol);
    check_against_reference(w, transpose(x, 0, 1), tol);
    // no unit stride at all, and a batch of transposed operands
    Tensor nc_a = test::random_tensor({9, 11}, dt, seed++, true);
    Tensor nc_b = test::random_tensor({11, 6}, dt, seed++, true);
    check_against_reference(nc_a, nc_b, tol);
    Tensor batch_a = test::random_tensor({3, 20, 65}, dt, seed++, true);
    Tensor batch_bt = transpose(test::random_tensor({3, 33, 65}, dt, seed++), -2, -1);  // (3, 65, 33)
    check_against_reference(batch_a, batch_bt, tol);
    // a slice with an offset into a larger buffer (row stride 20, offset 2 * 20 + 3)
    Tensor big = test::random_tensor({10, 20}, dt, seed++);
    Tensor sliced = slice(slice(big, 0, 2, 9), 1, 3, 16);  // (7, 13)
    REQUIRE(sliced.offset() == 43);
    check_against_reference(sliced, b, tol);
    check_against_reference(transpose(b, 0, 1), transpose(sliced, 0, 1), tol);
    // permuted batch dim: (M, B, K) -> (B, M, K) with a B shared by the batch
    Tensor perm = permute(test::random_tensor({6, 4, 9}, dt, seed++), {1, 0, 2});  // (4, 6, 9)
    Tensor shared = test::random_tensor({9, 5}, dt, seed++);
    check_against_reference(perm, shared, tol);
    // a stride-0 expanded operand
    Tensor row = test::random_tensor({1, 9}, dt, seed++);
    check_against_reference(expand(row, {6, 9}), shared, tol);
  }
}

TEST_CASE("matmul runs one kernel on views, without copying them first", "[matmul]") {
  Tensor a = transpose(test::random_tensor({64, 48}, DType::f32, 300), 0, 1);     // (48, 64)
  Tensor b = slice(test::random_tensor({64, 80}, DType::f32, 301), 1, 5, 69, 2);  // (64, 32), col stride 2
  test::OpCounter counter;
  Tensor out = matmul(a, b);
  REQUIRE(counter.names == std::vector<std::string>{"matmul"});
  check_against_reference(a, b, kTols[1]);
}

TEST_CASE("matmul with K == 0 gives zeros and empty shapes give empty results", "[matmul]") {
  for (const Tol& tol : kTols) {
    Tensor z = matmul(zeros({3, 0}, tol.dtype), zeros({0, 4}, tol.dtype));
    REQUIRE(z.shape() == Shape{3, 4});
    test::require_equal(z, zeros({3, 4}, tol.dtype));
    Tensor zb = matmul(zeros({2, 3, 0}, tol.dtype), zeros({0, 5}, tol.dtype));
    test::require_equal(zb, zeros({2, 3, 5}, tol.dtype));
    REQUIRE(matmul(zeros({0, 5}, tol.dtype), test::random_tensor({5, 3}, tol.dtype, 1)).shape() == Shape{0, 3});
    REQUIRE(matmul(test::random_tensor({4, 5}, tol.dtype, 2), zeros({5, 0}, tol.dtype)).shape() == Shape{4, 0});
    REQUIRE(matmul(zeros({0, 2, 3}, tol.dtype), test::random_tensor({3, 4}, tol.dtype, 3)).shape() == Shape{0, 2, 4});
  }
}

TEST_CASE("cpu::gemm accumulates into a strided C and reads arbitrary strides", "[matmul]") {
  // C (5, 7) inside rows of 9, += A (5, 11) read with strides (1, 6) @ B (11, 7) read with strides (2, 23)
  std::vector<double> abuf(80), bbuf(200), cbuf(5 * 9);
  for (size_t i = 0; i < abuf.size(); ++i) abuf[i] = std::sin(0.7 * static_cast<double>(i));
  for (size_t i = 0; i < bbuf.size(); ++i) bbuf[i] = std::cos(0.3 * static_cast<double>(i));
  for (size_t i = 0; i < cbuf.size(); ++i) cbuf[i] = static_cast<double>(i);
  std::vector<double> expect = cbuf;
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 7; ++j)
      for (int64_t p = 0; p < 11; ++p) {
        const double av = abuf[static_cast<size_t>(i + 6 * p)], bv = bbuf[static_cast<size_t>(2 * p + 23 * j)];
        expect[static_cast<size_t>(i * 9 + j)] += av * bv;
      }
  cpu::gemm<double>(5, 7, 11, {abuf.data(), 1, 6}, {bbuf.data(), 2, 23}, cbuf.data(), 9, true);
  for (size_t i = 0; i < cbuf.size(); ++i) REQUIRE(std::abs(cbuf[i] - expect[i]) < 1e-12);
}

TEST_CASE("matmul gradients match finite differences in f64", "[matmul]") {
  auto mm = [](const std::vector<Tensor>& x) { return matmul(x[0], x[1]); };
  struct Case {
    Shape a, b;
  };
  const Case cases[] = {
      {{3, 4}, {4, 5}},        {{1, 1}, {1, 1}},       {{2, 1, 3, 4}, {3, 4, 2}},  // broadcast both ways
      {{2, 3, 4}, {4, 5}},     {{3, 4}, {2, 4, 5}},    {{2, 3, 1, 4}, {1, 4, 1}},  // shared B (folded dB), shared A
  };
  uint64_t seed = 400;
  for (const Case& c : cases) {
    INFO(shape_str(c.a) << " @ " << shape_str(c.b));
    Tensor a = test::random_tensor(c.a, DType::f64, seed++);
    Tensor b = test::random_tensor(c.b, DType::f64, seed++);
    a.set_requires_grad(true);
    b.set_requires_grad(true);
    test::check_gradients(mm, {a, b});
  }
  // transposed and non-contiguous leaves, and only one input requiring grad
  Tensor a = test::random_tensor({5, 3}, DType::f64, 410, true);
  Tensor b = test::random_tensor({4, 5}, DType::f64, 411);
  a.set_requires_grad(true);
  b.set_requires_grad(true);
  auto mm_tt = [](const std::vector<Tensor>& x) { return matmul(transpose(x[0], 0, 1), transpose(x[1], 0, 1)); };
  test::check_gradients(mm_tt, {a, b});
  Tensor frozen = test::random_tensor({4, 5}, DType::f64, 412);
  test::check_gradients(mm, {test::random_tensor({2, 3, 4}, DType::f64, 413).set_requires_grad(true), frozen});
}

TEST_CASE("matmul rejects bad operands with [matmul] messages", "[matmul]") {
  Tensor m48 = test::random_tensor({4, 8}, DType::f32, 1);
  Tensor m62 = test::random_tensor({6, 2}, DType::f32, 2);
  REQUIRE_THROWS_AS(matmul(m48, m62), Error);
  REQUIRE_THROWS_WITH(matmul(m48, m62), "[matmul] inner dimensions differ: (4, 8) @ (6, 2)");
  // 1-d and 0-d operands
  Tensor v = test::random_tensor({8}, DType::f32, 3);
  REQUIRE_THROWS_AS(matmul(m48, v), Error);
  REQUIRE_THROWS_WITH(matmul(v, test::random_tensor({8, 2}, DType::f32, 4)),
                      ContainsSubstring("[matmul]") && ContainsSubstring("at least 2 dims"));
  REQUIRE_THROWS_WITH(matmul(scalar_tensor(1.0), m48), ContainsSubstring("[matmul]"));
  // dtypes: mixed, and integer
  REQUIRE_THROWS_WITH(matmul(m48, test::random_tensor({8, 2}, DType::f64, 5)),
                      ContainsSubstring("[matmul]") && ContainsSubstring("f32") && ContainsSubstring("f64"));
  Tensor i1 = test::random_tensor({2, 3}, DType::i64, 6);
  Tensor i2 = test::random_tensor({3, 2}, DType::i64, 7);
  REQUIRE_THROWS_AS(matmul(i1, i2), Error);
  REQUIRE_THROWS_WITH(matmul(i1, i2), ContainsSubstring("[matmul]") && ContainsSubstring("i64"));
  // batch dims that do not broadcast
  Tensor b234 = test::random_tensor({2, 3, 4}, DType::f32, 8);
  Tensor b345 = test::random_tensor({3, 4, 5}, DType::f32, 9);
  REQUIRE_THROWS_WITH(matmul(b234, b345), "[matmul] batch dimensions of (2, 3, 4) and (3, 4, 5) cannot be broadcast");
}

TEST_CASE("matmul gradients are differentiable again (create_graph)", "[matmul]") {
  // f(a, b) = d/da sum(a @ b * w) = w @ b^T, itself checked against finite differences in a and b
  Tensor w = test::random_tensor({2, 3, 5}, DType::f64, 500);
  auto grad_a = [w](const std::vector<Tensor>& x) {
    autograd::EnableGradGuard grad_on;  // the finite differences evaluate f under no_grad
    Tensor a = x[0];
    if (!a.requires_grad()) a = a.detach().set_requires_grad(true);
    return autograd::grad({sum(matmul(a, x[1]) * w)}, {a}, {}, false, /*create_graph=*/true)[0];
  };
  Tensor a = test::random_tensor({2, 3, 4}, DType::f64, 501);
  Tensor b = test::random_tensor({4, 5}, DType::f64, 502);
  b.set_requires_grad(true);
  test::check_gradients(grad_a, {a, b});
}

TEST_CASE("matmul_add adds C in the GEMM: rounds once, differentiates, rejects a C of another shape", "[matmul]") {
  // f64: a @ b + c exactly as the two ops, over batched, broadcast, strided and K = 0 shapes
  struct Case {
    Shape a, b;
  };
  const Case cases[] = {{{3, 4}, {4, 5}}, {{2, 3, 4}, {4, 5}}, {{2, 1, 3, 4}, {3, 4, 2}}, {{3, 0}, {0, 4}}};
  uint64_t seed = 600;
  for (const Case& c : cases) {
    INFO(shape_str(c.a) << " @ " << shape_str(c.b));
    Tensor a = test::random_tensor(c.a, DType::f64, seed++), b = test::random_tensor(c.b, DType::f64, seed++);
    Tensor cc = test::random_tensor(matmul(a, b).shape(), DType::f64, seed++);
    test::require_close(matmul_add(a, b, cc), add(matmul(a, b), cc), 1e-14, 1e-14);
    a.set_requires_grad(true);
    b.set_requires_grad(true);
    cc.set_requires_grad(true);
    test::check_gradients([](const std::vector<Tensor>& x) { return matmul_add(x[0], x[1], x[2]); }, {a, b, cc});
    // alpha scales the product in the GEMM, not the addend
    test::require_close(matmul_add(a, b, cc, -0.75), add(mul(matmul(a, b), -0.75), cc), 1e-14, 1e-14);
    test::require_close(matmul(a, b, 3.0), mul(matmul(a, b), 3.0), 1e-14, 1e-14);
    test::check_gradients([](const std::vector<Tensor>& x) { return matmul_add(x[0], x[1], x[2], -0.75); }, {a, b, cc});
    test::check_gradients([](const std::vector<Tensor>& x) { return matmul(x[0], x[1], 3.0); }, {a, b});
  }
  {  // backward needs a and b, never c: the addend is not kept alive by the graph
    Tensor a = test::random_tensor({3, 4}, DType::f64, 640).set_requires_grad(true);
    Tensor b = test::random_tensor({4, 5}, DType::f64, 641).set_requires_grad(true);
    Tensor cc = mul(test::random_tensor({3, 5}, DType::f64, 642).set_requires_grad(true), 2.0);
    const std::weak_ptr<TensorImpl> addend = cc.impl();
    Tensor y = matmul_add(a, b, cc);
    const auto& saved = y.grad_fn()->saved_inputs;
    REQUIRE(saved.size() == 3);
    CHECK((saved[0].defined() && saved[1].defined() && !saved[2].defined()));
    cc = Tensor();
    CHECK(addend.expired());
    sum(y).backward();
    CHECK(a.grad().defined());
  }
  // a transposed (non-contiguous) addend reads as its values
  Tensor a = test::random_tensor({5, 6}, DType::f32, 620), b = test::random_tensor({6, 4}, DType::f32, 621);
  Tensor ct = transpose(test::random_tensor({4, 5}, DType::f32, 622), 0, 1);
  test::require_close(matmul_add(a, b, ct), add(matmul(a, b), ct), 1e-6, 1e-6);
  // bf16: the sum of the f32 product and C rounds once, as cuBLASLt's epilogue does
  Tensor ab = test::random_tensor({9, 33}, DType::bf16, 623), bb = test::random_tensor({33, 7}, DType::bf16, 624);
  Tensor cb = test::random_tensor({9, 7}, DType::bf16, 625);
  const Tensor once = cast(add(matmul(ab.to(DType::f32), bb.to(DType::f32)), cb.to(DType::f32)), DType::bf16);
  test::require_close(matmul_add(ab, bb, cb), once, 1e-2, 1e-2);
  // C must be the product's shape, dtype and device: no broadcasting in the epilogue
  REQUIRE_THROWS_WITH(matmul_add(a, b, test::random_tensor({1, 4}, DType::f32, 626)),
                      ContainsSubstring("[matmul]") && ContainsSubstring("addend") && ContainsSubstring("(5, 4)"));
  REQUIRE_THROWS_WITH(matmul_add(a, b, test::random_tensor({5, 4}, DType::f64, 627)),
                      ContainsSubstring("[matmul]") && ContainsSubstring("addend"));
}

TEST_CASE("matmul_into writes the product into a given buffer, or adds it in place", "[matmul]") {
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    INFO(dtype_name(dt));
    const double tol = dt == DType::bf16 ? 2e-2 : 1e-6;
    Tensor a = test::random_tensor({7, 9}, dt, 630), b = test::random_tensor({9, 5}, dt, 631);
    Tensor big = test::random_tensor({12, 5}, dt, 632);
    const Tensor before = big.clone();
    matmul_into(narrow(big, 0, 3, 7), a, b);  // rows 3..9 of a contiguous buffer
    test::require_close(narrow(big, 0, 3, 7), matmul(a, b), tol, tol);
    test::require_close(narrow(big, 0, 0, 3), narrow(before, 0, 0, 3), 0, 0);  // the other rows untouched
    test::require_close(narrow(big, 0, 10, 2), narrow(before, 0, 10, 2), 0, 0);
    // out += a^T @ x, the addend being the output itself (one rounding per accumulation)
    Tensor acc = test::random_tensor({9, 5}, dt, 633);
    const Tensor acc0 = acc.clone();
    Tensor x = test::random_tensor({7, 5}, dt, 634);
    matmul_into(acc, transpose(a, 0, 1), x, true);
    test::require_close(acc, matmul_add(transpose(a, 0, 1), x, acc0), tol, tol);
  }
  Tensor out = test::random_tensor({4, 3}, DType::f32, 635);
  REQUIRE_THROWS_WITH(matmul_into(transpose(out, 0, 1), test::random_tensor({3, 2}, DType::f32, 636),
                                  test::random_tensor({2, 4}, DType::f32, 637)),
                      ContainsSubstring("contiguous"));
  REQUIRE_THROWS(matmul_into(out, test::random_tensor({4, 2}, DType::f32, 638), test::random_tensor({2, 5}, DType::f32, 639)));
}

// Shared test helpers (tests/helpers.h): random inputs seeded from Catch2's --rng-seed, strided views,
// f64 comparisons that print the worst element, and the float64 finite-difference gradient check.
#include "tests/helpers.h"

#include <algorithm>
#include <catch2/catch_get_random_seed.hpp>
#include <cmath>
#include <random>
#include <unistd.h>
#include <sstream>
#include <fstream>
#include <cstdlib>
#include <filesystem>
#include <fmt/format.h>
#include <limits>
#include <string>
#include <type_traits>

#include "core/random.h"

namespace kiln::test {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A different stream per (run seed, call-site seed): each run draws fresh inputs, and
// `kiln_tests --rng-seed N` replays a failing run exactly.
uint64_t mixed_seed(uint64_t seed) { return splitmix64(splitmix64(Catch::getSeed()) ^ splitmix64(seed + 1)); }

// Host copy of any tensor's values as doubles, computed without kiln's cast op (so comparing the
// result of cast does not go through cast).
std::vector<double> to_f64(const Tensor& t) {
  if (t.dtype() == DType::boolean) {
    std::vector<bool> v = t.to_vector<bool>();
    return std::vector<double>(v.begin(), v.end());
  }
  return visit_dtype(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<double> out;
    if constexpr (!std::is_same_v<T, bool>) {
      std::vector<T> v = t.to_vector<T>();
      out.reserve(v.size());
      for (const T& x : v) out.push_back(static_cast<double>(static_cast<compute_t<T>>(x)));
    }
    return out;
  });
}

// "[2, 0, 1]" for flat index 7 of shape (3, 2, 2).
std::string unravel(int64_t flat, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    int64_t n = std::max<int64_t>(shape[d], 1);
    idx[d] = flat % n;
    flat /= n;
  }
  return fmt::format("[{}]", fmt::join(idx, ", "));
}

// How far |a - b| is beyond the tolerance (<= 0 when close); +inf where NaNs do not coincide.
double excess(double a, double b, double rtol, double atol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0.0 : std::numeric_limits<double>::infinity();
  if (a == b) return 0.0;  // equal infinities
  double d = std::abs(a - b);
  if (std::isinf(d)) return std::numeric_limits<double>::infinity();
  return d - (atol + rtol * std::abs(b));
}

struct Worst {
  int64_t index = -1;
  double excess = 0.0;
  int64_t count = 0;  // elements beyond the tolerance
};

Worst find_worst(const std::vector<double>& a, const std::vector<double>& b, double rtol, double atol) {
  Worst w;
  for (size_t i = 0; i < a.size(); ++i) {
    double e = excess(a[i], b[i], rtol, atol);
    if (e > 0) {
      ++w.count;
      if (w.index < 0 || e > w.excess) { w.index = static_cast<int64_t>(i); w.excess = e; }
    }
  }
  return w;
}

Tensor host_tensor(const std::vector<double>& values, const Shape& shape, DType dtype) {
  Tensor t = from_vector<double>(values, shape);
  return dtype == DType::f64 ? t : cast(t, dtype);
}

}  // namespace

Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, bool noncontiguous) {
  Generator gen(mixed_seed(seed));
  autograd::NoGradGuard no_grad;
  Tensor t;
  switch (dtype) {
    case DType::f64:
    case DType::f32: t = randn(shape, dtype, kCPU, &gen); break;
    case DType::bf16:
    case DType::f16: t = cast(randn(shape, DType::f32, kCPU, &gen), dtype); break;
    case DType::u8: t = cast(randint(0, 10, shape, DType::i64, kCPU, &gen), dtype); break;  // unsigned: [0, 10)
    case DType::i64: t = randint(-5, 5, shape, DType::i64, kCPU, &gen); break;
    case DType::i32: t = cast(randint(-5, 5, shape, DType::i64, kCPU, &gen), dtype); break;
    case DType::boolean: t = lt(rand(shape, DType::f32, kCPU, &gen), 0.5); break;
  }
  return noncontiguous ? make_noncontiguous(t) : t;
}

Tensor random_away_from_zero(const Shape& shape, DType dtype, uint64_t seed, bool positive) {
  Generator gen(mixed_seed(seed ^ 0x5eedull));
  std::vector<double> u = rand(shape, DType::f64, kCPU, &gen).to_vector<double>();  // magnitudes
  std::vector<double> s = rand(shape, DType::f64, kCPU, &gen).to_vector<double>();  // signs
  std::vector<double> v(u.size());
  const bool integral = !is_floating(dtype);
  for (size_t i = 0; i < v.size(); ++i) {
    double mag = integral ? 1.0 + std::floor(u[i] * 4.0) : 0.5 + 1.5 * u[i];  // ints: 1..4
    bool neg = !positive && dtype != DType::u8 && dtype != DType::boolean && s[i] < 0.5;
    v[i] = neg ? -mag : mag;
  }
  autograd::NoGradGuard no_grad;
  return host_tensor(v, shape, dtype);
}

Tensor make_noncontiguous(const Tensor& t) {
  // A buffer laid out with the dims reversed and an extra trailing dim of 2; the view picks index 1
  // of that dim (offset 1, every stride doubled) and permutes the dims back: (3, 4) gets strides (2, 6).
  const int64_t nd = t.dim();
  Shape base_shape(t.shape().rbegin(), t.shape().rend());
  base_shape.push_back(2);
  autograd::NoGradGuard no_grad;
  Tensor base = zeros(base_shape, t.dtype(), t.device());
  Tensor v = base.select(-1, 1);
  if (nd >= 2) {
    std::vector<int64_t> perm(static_cast<size_t>(nd));
    for (int64_t d = 0; d < nd; ++d) perm[static_cast<size_t>(d)] = nd - 1 - d;
    v = v.permute(perm);
  }
  v.copy_(t.detach());
  if (t.requires_grad() && t.is_leaf()) v.set_requires_grad(true);
  return v;
}

bool all_close(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (a.shape() != b.shape()) return false;
  std::vector<double> va = to_f64(a), vb = to_f64(b);
  return find_worst(va, vb, rtol, atol).count == 0;
}

void require_close(const Tensor& a, const Tensor& b, double rtol, double atol) {
  INFO("shapes " << shape_str(a.shape()) << " " << dtype_name(a.dtype()) << " vs " << shape_str(b.shape()) << " "
                 << dtype_name(b.dtype()));
  REQUIRE(a.shape() == b.shape());
  std::vector<double> va = to_f64(a), vb = to_f64(b);
  Worst w = find_worst(va, vb, rtol, atol);
  if (w.count == 0) return;
  const size_t i = static_cast<size_t>(w.index);
  FAIL(fmt::format("not close (rtol {:g}, atol {:g}): {} of {} elements differ; worst at {} (flat {}): {:.10g} vs "
                   "{:.10g} (|diff| {:.3g})",
                   rtol, atol, w.count, va.size(), unravel(w.index, a.shape()), w.index, va[i], vb[i],
                   std::abs(va[i] - vb[i])));
}

void require_equal(const Tensor& a, const Tensor& b) {
  INFO("shapes " << shape_str(a.shape()) << " " << dtype_name(a.dtype()) << " vs " << shape_str(b.shape()) << " "
                 << dtype_name(b.dtype()));
  REQUIRE(a.shape() == b.shape());
  std::vector<double> va = to_f64(a), vb = to_f64(b);
  int64_t first = -1, count = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    bool same = va[i] == vb[i] || (std::isnan(va[i]) && std::isnan(vb[i]));
    if (!same) {
      ++count;
      if (first < 0) first = static_cast<int64_t>(i);
    }
  }
  if (count == 0) return;
  const size_t i = static_cast<size_t>(first);
  FAIL(fmt::format("not equal: {} of {} elements differ; first at {} (flat {}): {:.10g} vs {:.10g}", count, va.size(),
                   unravel(first, a.shape()), first, va[i], vb[i]));
}

void check_gradients(const TestFn& f, const std::vector<Tensor>& inputs, double eps, double rtol, double atol) {
  bool any = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (!x.defined() || !x.requires_grad()) continue;
    any = true;
    if (x.dtype() != DType::f64) {
      FAIL(fmt::format("check_gradients needs float64 inputs; input {} is {}", i, dtype_name(x.dtype())));
    }
  }
  if (!any) FAIL("check_gradients: no input requires grad");

  // Fresh leaves on every evaluation, so no history or .grad leaks between evaluations or into the caller's tensors.
  auto leaves_of = [&](const std::vector<Tensor>& xs, bool with_grad) {
    std::vector<Tensor> out;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (!xs[i].defined()) { out.emplace_back(); continue; }
      Tensor l = xs[i].detach();
      if (with_grad && inputs[i].requires_grad()) l.set_requires_grad(true);
      out.push_back(l);
    }
    return out;
  };

  // Analytic: d<f(x), r>/dx through autograd, r a fixed random cotangent.
  std::vector<Tensor> leaves = leaves_of(inputs, true);
  Tensor out;
  {
    autograd::EnableGradGuard grad_on;
    out = f(leaves);
  }
  REQUIRE(out.defined());
  REQUIRE(is_floating(out.dtype()));
  Generator gen(mixed_seed(0xc0ffeeull));
  Tensor r = randn(out.shape(), DType::f64, kCPU, &gen);  // same shape as f(x)
  const std::vector<double> rv = r.to_vector<double>();

  std::vector<Tensor> wrt;
  std::vector<size_t> wrt_index;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) { wrt.push_back(leaves[i]); wrt_index.push_back(i); }
  }
  std::vector<std::vector<double>> analytic(wrt.size());
  if (out.requires_grad()) {
    std::vector<Tensor> g = autograd::grad({out}, wrt, {r});
    REQUIRE(g.size() == wrt.size());
    for (size_t k = 0; k < g.size(); ++k) {
      INFO("gradient of input " << wrt_index[k]);
      REQUIRE(g[k].defined());
      REQUIRE(g[k].shape() == wrt[k].shape());
      analytic[k] = to_f64(g[k]);
    }
  } else {
    for (size_t k = 0; k < wrt.size(); ++k) analytic[k].assign(static_cast<size_t>(wrt[k].numel()), 0.0);
  }

  // Numeric: central differences, perturbing one element of a contiguous clone at a time.
  autograd::NoGradGuard no_grad;
  std::vector<Tensor> point;
  for (const Tensor& x : inputs) {
    Tensor c = x.defined() ? x.detach().clone() : Tensor();
    if (c.defined() && !c.is_contiguous()) c = contiguous(c);
    point.push_back(c);
  }
  auto loss_at = [&]() {
    Tensor y = f(leaves_of(point, false));
    std::vector<double> yv = to_f64(y);
    REQUIRE(yv.size() == rv.size());
    double s = 0.0;
    for (size_t j = 0; j < yv.size(); ++j) s += yv[j] * rv[j];
    return s;
  };

  struct Report {
    size_t input = 0;
    int64_t element = -1;
    double excess = 0.0, analytic = 0.0, numeric = 0.0;
    int64_t count = 0;
  } worst;
  for (size_t k = 0; k < wrt.size(); ++k) {
    Tensor& x = point[wrt_index[k]];
    double* p = x.data_ptr<double>();  // contiguous clone: (numel,)
    for (int64_t j = 0; j < x.numel(); ++j) {
      const double saved = p[j];
      p[j] = saved + eps;
      const double up = loss_at();
      p[j] = saved - eps;
      const double down = loss_at();
      p[j] = saved;
      const double numeric = (up - down) / (2.0 * eps);
      const double a = analytic[k][static_cast<size_t>(j)];
      const double e = excess(a, numeric, rtol, atol);
      if (e > 0) {
        ++worst.count;
        if (worst.element < 0 || e > worst.excess) worst = {wrt_index[k], j, e, a, numeric, worst.count};
      }
    }
  }
  if (worst.count == 0) return;
  FAIL(fmt::format("gradient check failed (eps {:g}, rtol {:g}, atol {:g}): {} elements off; worst is input {} "
                   "(shape {}) at {}: analytic {:.10g}, numeric {:.10g} (|diff| {:.3g})",
                   eps, rtol, atol, worst.count, worst.input, shape_str(inputs[worst.input].shape()),
                   unravel(worst.element, inputs[worst.input].shape()), worst.analytic, worst.numeric,
                   std::abs(worst.analytic - worst.numeric)));
}

int OpCounter::count(const std::string& name) const {
  return static_cast<int>(std::count(names.begin(), names.end(), name));
}

namespace {

// `relative` under the first of `roots` where it exists, else under the first root.
std::filesystem::path first_existing(const std::vector<std::filesystem::path>& roots, const std::string& relative) {
  for (const auto& r : roots)
    if (std::filesystem::exists(r / relative)) return r / relative;
  return roots.front() / relative;
}

// The working directory and the test program's folder with its parents (3 levels: build/tests/kiln_tests).
std::vector<std::filesystem::path> search_bases() {
  std::vector<std::filesystem::path> bases{std::filesystem::current_path()};
  std::error_code ec;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  for (int up = 0; !ec && up < 4 && exe.has_parent_path() && exe != exe.parent_path(); ++up) {
    exe = exe.parent_path();
    bases.push_back(exe);
  }
  return bases;
}

}  // namespace

std::filesystem::path test_data(const std::string& relative) {
  std::vector<std::filesystem::path> roots;
#ifdef KILN_TEST_DATA
  roots.emplace_back(KILN_TEST_DATA);
#endif
  if (const char* env = std::getenv("KILN_TEST_DATA")) roots.insert(roots.begin(), env);
  for (const auto& b : search_bases()) roots.push_back(b / "tests" / "data");
  return first_existing(roots, relative);
}

std::filesystem::path shared_data(const std::string& relative) {
  std::vector<std::filesystem::path> roots;
#ifdef KILN_SHARED_DATA
  roots.emplace_back(KILN_SHARED_DATA);
#endif
  if (const char* env = std::getenv("KILN_SHARED_DATA")) roots.insert(roots.begin(), env);
  for (const auto& b : search_bases()) {
    roots.push_back(b / ".." / "shared" / "data");
    roots.push_back(b / "shared" / "data");
  }
  return first_existing(roots, relative);
}

std::filesystem::path scratch_dir(const std::string& prefix, const std::string& name) {
  const std::filesystem::path p =
      std::filesystem::temp_directory_path() / ("kiln_" + prefix + "_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<data::Document> random_documents(int n, uint64_t seed, int64_t vocab) {
  std::mt19937_64 rng(seed);
  std::vector<data::Document> docs(static_cast<size_t>(n));
  for (data::Document& d : docs) {
    const size_t len = 12 + data::bounded_draw(rng, 36), prompt = data::bounded_draw(rng, len / 2);
    for (size_t i = 0; i < len; ++i) {
      d.ids.push_back(static_cast<int32_t>(1 + data::bounded_draw(rng, static_cast<uint64_t>(vocab - 1))));
      d.loss.push_back(i > prompt ? 1 : 0);
    }
  }
  return docs;
}

nn::LlamaConfig tiny_llama_config(int64_t layers) {
  nn::LlamaConfig c;
  c.vocab_size = 41;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rope_scaling = nn::RopeScaling{4.0, 1.0, 4.0, 8};
  c.rms_norm_eps = 1e-6;
  return c;
}

}  // namespace kiln::test

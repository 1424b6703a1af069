// Shared by the dist tests and their multi-process worker: deterministic per-rank inputs (every rank
// can build every other rank's), the collectives' reference results (reductions in rank order, in the
// compute type the backends promise: f32 for f32/bf16, f64, i64), an exact comparison, and running
// tests/test_dist_worker as the ranks of a job (dist::launch) with a folder for what each rank saw.
#pragma once
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "dist/launch.h"

namespace kiln::test {

// Rank `rank`'s tensor for a test case `salt`: distinct per rank and element, exact in every dtype
// up to its own rounding (bf16 rounds the f32 value). nan_at >= 0 puts a NaN at that element (floats).
inline Tensor dist_input(int rank, const Shape& shape, DType dtype, uint64_t salt, int64_t nan_at = -1) {
  const int64_t n = kiln::numel(shape);
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = (static_cast<uint64_t>(rank) * 7919u + static_cast<uint64_t>(i) * 104729u + salt * 1299709u) % 2001u;
    if (dtype == DType::u8) v[static_cast<size_t>(i)] = static_cast<double>(h % 256u);
    else if (dtype == DType::i64) v[static_cast<size_t>(i)] = static_cast<double>(h) - 1000.0;
    else v[static_cast<size_t>(i)] = (static_cast<double>(h) - 1000.0) / 64.0;
  }
  if (nan_at >= 0 && nan_at < n) v[static_cast<size_t>(nan_at)] = std::numeric_limits<double>::quiet_NaN();
  return cast(from_vector<double>(v, shape), dtype);
}

// op over ranks of `inputs`, element by element in rank order, in the backends' compute type.
inline Tensor dist_reference_reduce(const std::vector<Tensor>& inputs, bool max) {
  const DType dtype = inputs[0].dtype();
  std::vector<std::vector<double>> xs;
  for (const Tensor& t : inputs) xs.push_back(t.to(DType::f64).to_vector<double>());
  std::vector<double> out(xs[0].size());
  auto combine = [max](auto acc, auto v) {
    if (!max) return acc + v;
    if constexpr (std::is_floating_point_v<decltype(acc)>) {
      if (std::isnan(v) || (!std::isnan(acc) && v > acc)) return v;
      return acc;
    } else {
      return v > acc ? v : acc;
    }
  };
  for (size_t i = 0; i < out.size(); ++i) {
    if (dtype == DType::f64) {
      double acc = xs[0][i];
      for (size_t r = 1; r < xs.size(); ++r) acc = combine(acc, xs[r][i]);
      out[i] = acc;
    } else if (dtype == DType::i64) {
      int64_t acc = static_cast<int64_t>(xs[0][i]);
      for (size_t r = 1; r < xs.size(); ++r) acc = combine(acc, static_cast<int64_t>(xs[r][i]));
      out[i] = static_cast<double>(acc);
    } else {  // f32, bf16: accumulated in f32
      float acc = static_cast<float>(xs[0][i]);
      for (size_t r = 1; r < xs.size(); ++r) acc = combine(acc, static_cast<float>(xs[r][i]));
      out[i] = acc;
    }
  }
  return cast(from_vector<double>(out, inputs[0].shape()), dtype);
}

// "" when `got` equals `want` exactly (same shape and dtype; NaNs must coincide), else what differs.
inline std::string dist_compare(const Tensor& got, const Tensor& want) {
  if (got.shape() != want.shape()) return "shapes differ";
  if (got.dtype() != want.dtype()) return "dtypes differ";
  std::vector<double> a = got.to(kCPU).to(DType::f64).to_vector<double>();
  std::vector<double> b = want.to(kCPU).to(DType::f64).to_vector<double>();
  for (size_t i = 0; i < a.size(); ++i) {
    const bool same = (std::isnan(a[i]) && std::isnan(b[i])) || a[i] == b[i];
    if (!same) return "element " + std::to_string(i) + ": got " + std::to_string(a[i]) + ", expected " + std::to_string(b[i]);
  }
  return "";
}

// A fresh folder for the ranks' files, exported as KILN_TEST_OUT for the scope.
class OutDir {
 public:
  OutDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kiln-dist-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
    ::setenv("KILN_TEST_OUT", path_.c_str(), 1);
  }
  ~OutDir() {
    ::unsetenv("KILN_TEST_OUT");
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  OutDir(const OutDir&) = delete;
  OutDir& operator=(const OutDir&) = delete;
  const std::string& path() const { return path_; }
  std::string read(const std::string& name) const {
    std::ifstream in(path_ + "/" + name);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  std::string path_;
};

// Runs tests/test_dist_worker (built next to kiln_tests) as `world` ranks of `scenario` on `backend`
// ("gloo": CPU tensors, "nccl": cuda:<local rank>) with a collective timeout; each rank writes its
// outcome into the current OutDir. Returns launch's status.
inline int run_workers(int world, const std::string& scenario, const std::string& backend, int timeout_ms) {
  const auto worker = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "test_dist_worker";
  KILN_CHECK(std::filesystem::exists(worker), "dist test", "{} is missing: build it (tests/meson.build)", worker.string());
  ::setenv("KILN_TEST_BACKEND", backend.c_str(), 1);
  ::setenv("KILN_TEST_TIMEOUT_MS", std::to_string(timeout_ms).c_str(), 1);
  dist::LaunchOptions o;
  o.nproc = world;
  o.grace = std::chrono::seconds(5);
  return dist::launch(o, {worker.string(), scenario});
}

}  // namespace kiln::test

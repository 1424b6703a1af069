// Shared test helpers: random inputs of any dtype (optionally as non-contiguous views), tensor
// comparison with tolerances, and the float64 finite-difference gradient check every op goes through.
#pragma once
#include <catch2/catch_test_macros.hpp>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "core/dispatch.h"
#include "core/ops.h"
#include "data/packing.h"
#include "nn/llama.h"

namespace kiln::test {

// Fresh random values from a test-local generator (seeded per call site by `seed`). Integer
// dtypes draw from [-5, 5); bool from {false, true}. With `noncontiguous`, the result is a
// transposed or strided view of a larger tensor holding the same values.
Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, bool noncontiguous = false);
// Values away from zero (|x| in [0.5, 2)), for ops with a kink or pole at 0 (abs, log, div, pow).
Tensor random_away_from_zero(const Shape& shape, DType dtype, uint64_t seed, bool positive = false);
// Returns a view with the same shape and values whose strides are not contiguous.
Tensor make_noncontiguous(const Tensor& t);

// Max |a-b| <= atol + rtol*|b| elementwise (compared in f64); shapes must match. NaNs must coincide.
bool all_close(const Tensor& a, const Tensor& b, double rtol = 1e-5, double atol = 1e-8);
// Like all_close, but a Catch2 failure prints the worst element and both values.
void require_close(const Tensor& a, const Tensor& b, double rtol = 1e-5, double atol = 1e-8);
// Exact equality of values (after casting both to f64).
void require_equal(const Tensor& a, const Tensor& b);

// Float64 finite-difference check of every input that requires grad:
// L(x) = sum(f(x) * r) with a fixed random r; compares autograd's dL/dx with central differences.
using TestFn = std::function<Tensor(const std::vector<Tensor>&)>;
void check_gradients(const TestFn& f, const std::vector<Tensor>& inputs, double eps = 1e-6, double rtol = 1e-5,
                     double atol = 1e-7);

// Counts the ops that pass through dispatch while alive (by name).
struct OpCounter : DispatchObserver {
  std::vector<std::string> names;
  ObserverScope scope{this};
  void on_op(const Primitive& op, const std::vector<Tensor>&, const std::vector<Tensor>&) override {
    names.emplace_back(op.name());
  }
  int count(const std::string& name) const;
};

// A fixture under tests/data (`test_data("nf4/tiny.safetensors")`) or the shared reference data
// (`shared_data("llama3.1-tokenizer/tokenizer.json")`): $KILN_TEST_DATA / $KILN_SHARED_DATA first, then
// the folders the build recorded, then tests/data and ../shared/data seen from the working directory and
// from the test program's folder and its parents — so the suite finds them wherever the tree was copied.
// The first candidate that exists; else the build's (the test then reports the missing file).
std::filesystem::path test_data(const std::string& relative);
std::filesystem::path shared_data(const std::string& relative);

// A fresh, empty folder for one test: <temp>/kiln_<prefix>_<name>_<pid> (removed first if it exists).
std::filesystem::path scratch_dir(const std::string& prefix, const std::string& name);
// A whole file's bytes ("" when it cannot be read).
std::string read_file(const std::filesystem::path& path);

// n documents of 12..47 random ids in [1, vocab), each with a random masked prefix (a prompt).
std::vector<data::Document> random_documents(int n, uint64_t seed, int64_t vocab);

// Counts the ops that reach the kernels (views excluded), in all and by op name, below any handler
// installed before it.
struct KernelCounter : DispatchHandler {
  int kernels = 0;
  std::map<std::string, int> by_name;
  int count(const std::string& name) const {
    auto it = by_name.find(name);
    return it == by_name.end() ? 0 : it->second;
  }
  std::vector<Tensor> run(const PrimitivePtr& op, const std::vector<Tensor>& inputs) override {
    if (!op->is_view()) ++kernels, ++by_name[op->name()];
    return dispatch_next(op, inputs);
  }
  void run_into(const PrimitivePtr& op, const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs) override {
    ++kernels, ++by_name[op->name()];
    dispatch_next_into(op, inputs, outputs);
  }
};

// A tiny Llama (vocab 41, hidden 32, MLP 48, 4 heads of 8, 2 KV heads, llama3 RoPE scaling) with
// `layers` decoder layers.
nn::LlamaConfig tiny_llama_config(int64_t layers = 2);

}  // namespace kiln::test

// The rank program of dist/'s multi-process tests (test_dist_gloo.cpp, test_dist_cuda.cpp start it
// through dist::launch): `test_dist_worker <scenario>` joins the job with dist::init, plays the scenario and
// writes "ok" or "error after N ms: <message>" to $KILN_TEST_OUT/rank<R>.txt, then exits 0 (so the
// launcher never stops the other ranks: the test reads what each one saw).
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

#include "dist/init.h"
#include "tests/test_dist_common.h"

using namespace kiln;
using kiln::test::dist_compare;
using kiln::test::dist_input;
using kiln::test::dist_reference_reduce;

namespace {

using Clock = std::chrono::steady_clock;

void expect_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  std::string d = dist_compare(got, want);
  if (!d.empty()) throw std::runtime_error(what + ": " + d);
}

Shape stacked(const Shape& shard, int world) {
  if (shard.empty()) return {world};
  Shape s = shard;
  s[0] *= world;
  return s;
}

// Every collective against its reference on this rank (the same cases as the local backend's tests),
// with this rank's tensors on `dev`.
void collectives(dist::ProcessGroup& pg, Device dev) {
  const int world = pg.size(), rank = pg.rank();
  const std::vector<Shape> gather_shapes = {{}, {0, 3}, {1, 3}, {7, 3}};
  for (DType dtype : {DType::f32, DType::bf16, DType::u8, DType::i64}) {
    for (size_t k = 0; k < gather_shapes.size(); ++k) {
      std::vector<Tensor> all;
      for (int r = 0; r < world; ++r) all.push_back(dist_input(r, gather_shapes[k], dtype, k));
      Tensor out = full(stacked(gather_shapes[k], world), 77, dtype, dev);
      pg.all_gather(out, all[static_cast<size_t>(rank)].to(dev)).wait();
      expect_equal(out, gather_shapes[k].empty() ? stack(all, 0) : cat(all, 0),
                   std::string("all_gather ") + dtype_name(dtype) + " case " + std::to_string(k));
    }
  }
  const std::vector<Shape> shards = {{}, {0, 3}, {5, 3}, {3000}};
  for (DType dtype : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
    for (size_t k = 0; k < shards.size(); ++k) {
      std::vector<Tensor> all;
      for (int r = 0; r < world; ++r) all.push_back(dist_input(r, stacked(shards[k], world), dtype, 10 + k));
      Tensor out = full(shards[k], 77, dtype, dev);
      pg.reduce_scatter(out, all[static_cast<size_t>(rank)].to(dev)).wait();
      const int64_t n = shards[k].empty() ? 1 : shards[k][0];
      expect_equal(out, dist_reference_reduce(all, false).narrow(0, rank * n, n).reshape(shards[k]),
                   std::string("reduce_scatter ") + dtype_name(dtype) + " case " + std::to_string(k));
      for (bool max : {false, true}) {
        const Shape shape = stacked(shards[k], world);
        std::vector<Tensor> ins;
        for (int r = 0; r < world; ++r)
          ins.push_back(dist_input(r, shape, dtype, 20 + k, max && is_floating(dtype) && r == world - 1 ? 0 : -1));
        Tensor t = ins[static_cast<size_t>(rank)].to(dev).clone();
        pg.all_reduce(t, max ? dist::ReduceOp::max : dist::ReduceOp::sum).wait();
        expect_equal(t, dist_reference_reduce(ins, max),
                     std::string("all_reduce ") + (max ? "max " : "sum ") + dtype_name(dtype) + " case " + std::to_string(k));
      }
    }
  }
  for (int root = 0; root < world; ++root) {
    Tensor t = dist_input(rank, {4, 3}, DType::bf16, 30).to(dev);
    pg.broadcast(t, root).wait();
    expect_equal(t, dist_input(root, {4, 3}, DType::bf16, 30), "broadcast from root " + std::to_string(root));
  }
  // Two collectives in flight before the first wait.
  Tensor a = full({3}, rank + 1, DType::i64, dev), b = full({3}, 1, DType::i64, dev);
  dist::Work wa = pg.all_reduce(a), wb = pg.all_reduce(b);
  wb.wait();
  wa.wait();
  expect_equal(a, full({3}, world * (world + 1) / 2, DType::i64), "async all_reduce a");
  expect_equal(b, full({3}, world, DType::i64), "async all_reduce b");
  pg.barrier().wait();
}

// Plays `scenario` on `w`; returns "ok" (a failure throws).
std::string play(const std::string& scenario, dist::World& w) {
  dist::ProcessGroup& pg = *w.group;
  const int rank = pg.rank(), last = pg.size() - 1;
  if (scenario == "collectives") {
    collectives(pg, w.device);
    return "ok";
  }
  Tensor x = ones({16}, DType::f32, w.device);
  pg.all_reduce(x).wait();  // collective #0: everyone
  if (scenario == "stall" && rank == last) std::this_thread::sleep_for(pg.timeout() * 5 / 2);
  if (scenario == "vanish" && rank == last) {
    std::ofstream(std::string(std::getenv("KILN_TEST_OUT")) + "/rank" + std::to_string(rank) + ".txt") << "vanished";
    ::_exit(0);  // no goodbye: the process is simply gone
  }
  if (scenario == "mismatch") {
    const int n = rank == 1 ? 3 : 4;
    pg.all_gather(empty({n * pg.size()}, DType::f32, w.device), ones({n}, DType::f32, w.device)).wait();
  } else {
    pg.all_reduce(x).wait();  // collective #1
  }
  // NCCL's wait only orders this rank's stream: a barrier holds the host, and fails once the group is.
  pg.barrier().wait();
  return "ok";
}

}  // namespace

int main(int argc, char** argv) {
  const char* out = std::getenv("KILN_TEST_OUT");
  if (argc != 2 || out == nullptr) {
    std::fprintf(stderr, "usage: KILN_TEST_OUT=dir test_dist_worker collectives|stall|vanish|mismatch|settings\n");
    return 2;
  }
  const std::string scenario = argv[1];
  dist::InitOptions o;
  if (const char* b = std::getenv("KILN_TEST_BACKEND")) o.backend = b;
  if (o.backend != "nccl") o.device = kCPU;  // nccl: cuda:<local rank>
  if (const char* t = std::getenv("KILN_TEST_TIMEOUT_MS")) o.timeout = std::chrono::milliseconds(std::atoi(t));
  int rank = 0;
  std::string result;
  std::optional<dist::World> world;  // outlives the result: its end (rank 0 waits for the others) is not timed
  const auto start = Clock::now();
  try {
    const dist::Environment env = dist::read_environment();
    rank = env.rank;
    if (scenario == "settings") o.same_settings = {{"config", rank == env.world_size - 1 ? "b" : "a"}};
    world = dist::init(o);
    result = play(scenario, *world);
  } catch (const std::exception& e) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
    result = "error after " + std::to_string(ms) + " ms: " + e.what();
  }
  std::ofstream(std::string(out) + "/rank" + std::to_string(rank) + ".txt") << result;
  world.reset();
  return 0;
}

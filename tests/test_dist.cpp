// dist/'s local backend (ranks as threads, CPU): every collective against its reference for worlds
// 1-5 (odd sizes, empty and 0-d tensors, bf16/f32/f64/i64/u8), uneven shards through the caller's
// padding, async calls, argument checks, calls that differ across ranks, and the failure paths: a
// rank that stalls, fails or leaves makes every other rank error, naming it, within the timeout.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <chrono>
#include <mutex>
#include <thread>

#include "dist/local.h"
#include "dist/store.h"
#include "tests/helpers.h"
#include "tests/test_dist_common.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
using kiln::test::dist_compare;
using kiln::test::dist_input;
using kiln::test::dist_reference_reduce;
using std::chrono::milliseconds;

namespace {

using Clock = std::chrono::steady_clock;

// Shape (n * world, rest...) of n-row shards stacked over `world` ranks; a 0-d shard stacks into (world).
Shape stacked(const Shape& shard, int world) {
  if (shard.empty()) return {world};
  Shape s = shard;
  s[0] *= world;
  return s;
}

// Per-rank error messages of one run_local (empty where the rank succeeded).
struct Errors {
  std::mutex mutex;
  std::vector<std::string> by_rank;
  explicit Errors(int n) : by_rank(static_cast<size_t>(n)) {}
  void set(int r, const std::string& e) {
    std::lock_guard<std::mutex> lock(mutex);
    by_rank[static_cast<size_t>(r)] = e;
  }
};

}  // namespace

TEST_CASE("local all_gather concatenates every rank's input in rank order", "[dist]") {
  const std::vector<Shape> shapes = {{}, {0, 3}, {1, 3}, {7, 3}, {2, 5, 2}};
  for (int world = 1; world <= 5; ++world) {
    for (DType dtype : {DType::f32, DType::bf16, DType::u8, DType::i64}) {
      for (size_t k = 0; k < shapes.size(); ++k) {
        CAPTURE(world, dtype_name(dtype), k);
        std::vector<Tensor> in, out;
        for (int r = 0; r < world; ++r) {
          in.push_back(dist_input(r, shapes[k], dtype, k));
          if (k == 4) in.back() = test::make_noncontiguous(in.back());  // copied to contiguous first
          out.push_back(full(stacked(shapes[k], world), 77, dtype));
        }
        dist::run_local(world, [&](dist::ProcessGroup& pg) {
          pg.all_gather(out[static_cast<size_t>(pg.rank())], in[static_cast<size_t>(pg.rank())]).wait();
        });
        Tensor want = shapes[k].empty() ? stack(in, 0) : cat(in, 0);
        for (int r = 0; r < world; ++r) REQUIRE(dist_compare(out[static_cast<size_t>(r)], want) == "");
      }
    }
  }
}

TEST_CASE("local reduce_scatter sums each rank's rows in rank order (bf16 in f32)", "[dist]") {
  const std::vector<Shape> shards = {{}, {0, 3}, {1, 3}, {5, 3}, {3000}};
  for (int world = 1; world <= 5; ++world) {
    for (DType dtype : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
      for (size_t k = 0; k < shards.size(); ++k) {
        CAPTURE(world, dtype_name(dtype), k);
        std::vector<Tensor> in, out;
        for (int r = 0; r < world; ++r) {
          in.push_back(dist_input(r, stacked(shards[k], world), dtype, 10 + k));
          out.push_back(full(shards[k], 77, dtype));
        }
        dist::run_local(world, [&](dist::ProcessGroup& pg) {
          pg.reduce_scatter(out[static_cast<size_t>(pg.rank())], in[static_cast<size_t>(pg.rank())]).wait();
        });
        Tensor sum = dist_reference_reduce(in, false);
        for (int r = 0; r < world; ++r) {
          const int64_t n = shards[k].empty() ? 1 : shards[k][0];
          Tensor want = sum.narrow(0, r * n, n).reshape(shards[k]);
          REQUIRE(dist_compare(out[static_cast<size_t>(r)], want) == "");
        }
      }
    }
  }
}

TEST_CASE("local all_reduce sums and takes NaN-propagating maxima in place", "[dist]") {
  const std::vector<Shape> shapes = {{}, {1}, {4099}, {3, 0}};
  for (int world = 1; world <= 5; ++world) {
    for (DType dtype : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
      for (bool max : {false, true}) {
        for (size_t k = 0; k < shapes.size(); ++k) {
          CAPTURE(world, dtype_name(dtype), max, k);
          std::vector<Tensor> in, t;
          for (int r = 0; r < world; ++r) {
            // A NaN on the last rank: max must return it.
            const bool nan = max && is_floating(dtype) && r == world - 1;
            in.push_back(dist_input(r, shapes[k], dtype, 20 + k, nan ? 0 : -1));
            t.push_back(in.back().clone());
          }
          dist::run_local(world, [&](dist::ProcessGroup& pg) {
            pg.all_reduce(t[static_cast<size_t>(pg.rank())], max ? dist::ReduceOp::max : dist::ReduceOp::sum).wait();
          });
          Tensor want = dist_reference_reduce(in, max);
          for (int r = 0; r < world; ++r) REQUIRE(dist_compare(t[static_cast<size_t>(r)], want) == "");
          if (max && is_floating(dtype) && kiln::numel(shapes[k]) > 0) REQUIRE(std::isnan(t[0].to(DType::f64).to_vector<double>()[0]));
        }
      }
    }
  }
}

TEST_CASE("local broadcast copies the root's tensor to every rank", "[dist]") {
  for (int world = 1; world <= 5; ++world) {
    for (DType dtype : {DType::u8, DType::bf16, DType::f32}) {
      for (int root = 0; root < world; ++root) {
        CAPTURE(world, dtype_name(dtype), root);
        std::vector<Tensor> t;
        for (int r = 0; r < world; ++r) t.push_back(dist_input(r, {4, 3}, dtype, 30));
        Tensor want = t[static_cast<size_t>(root)].clone();
        dist::run_local(world, [&](dist::ProcessGroup& pg) { pg.broadcast(t[static_cast<size_t>(pg.rank())], root).wait(); });
        for (int r = 0; r < world; ++r) REQUIRE(dist_compare(t[static_cast<size_t>(r)], want) == "");
      }
    }
  }
}

TEST_CASE("local uneven shards: the caller pads to a multiple of the world and narrows back", "[dist]") {
  // 10 rows over 3 ranks: shards of 4 rows, the last one half padding.
  const int world = 3;
  Tensor full_tensor = dist_input(0, {10, 2}, DType::bf16, 40);
  Tensor padded = zeros({12, 2}, DType::bf16);
  padded.narrow(0, 0, 10).copy_(full_tensor);
  std::vector<Tensor> shards, gathered, grads, reduced;
  for (int r = 0; r < world; ++r) {
    shards.push_back(padded.narrow(0, 4 * r, 4).clone());
    gathered.push_back(empty({12, 2}, DType::bf16));
    grads.push_back(dist_input(r, {12, 2}, DType::f32, 41));
    reduced.push_back(empty({4, 2}, DType::f32));
  }
  dist::run_local(world, [&](dist::ProcessGroup& pg) {
    const auto r = static_cast<size_t>(pg.rank());
    dist::Work a = pg.all_gather(gathered[r], shards[r]);
    dist::Work b = pg.reduce_scatter(reduced[r], grads[r]);
    a.wait();
    b.wait();
  });
  Tensor sum = dist_reference_reduce(grads, false);
  for (int r = 0; r < world; ++r) {
    REQUIRE(dist_compare(gathered[static_cast<size_t>(r)].narrow(0, 0, 10), full_tensor) == "");
    REQUIRE(dist_compare(reduced[static_cast<size_t>(r)], sum.narrow(0, 4 * r, 4)) == "");
  }
}

TEST_CASE("local collectives run asynchronously in call order; barrier waits for every rank", "[dist]") {
  const int world = 4;
  std::vector<Tensor> t;
  for (int r = 0; r < world; ++r) t.push_back(full({5}, r + 1, DType::i64));
  std::vector<int> seen_after_barrier(world, 0), completed(world, 0);
  std::atomic<int> arrived{0};
  dist::run_local(world, [&](dist::ProcessGroup& pg) {
    const auto r = static_cast<size_t>(pg.rank());
    std::vector<dist::Work> works;
    for (int i = 0; i < 3; ++i) works.push_back(pg.all_reduce(t[r]));  // three sums in a row: x world^3
    for (auto& w : works) w.wait();
    completed[r] = works.back().is_completed();
    if (pg.rank() == 1) std::this_thread::sleep_for(milliseconds(50));
    arrived++;
    pg.barrier().wait();
    seen_after_barrier[r] = arrived.load();
  });
  const int64_t want = (1 + 2 + 3 + 4) * world * world;
  for (int r = 0; r < world; ++r) {
    REQUIRE(t[static_cast<size_t>(r)].to_vector<int64_t>() == std::vector<int64_t>(5, want));
    REQUIRE(seen_after_barrier[static_cast<size_t>(r)] == world);
    REQUIRE(completed[static_cast<size_t>(r)] == 1);
  }
  REQUIRE(dist::Work().is_completed());
}

TEST_CASE("local collectives check one rank's arguments", "[dist]") {
  auto pg = dist::make_local_groups(1)[0];
  Tensor x = zeros({4, 3});
  REQUIRE_THROWS_WITH(pg->all_gather(zeros({5, 3}), x), ContainsSubstring("[all_gather] expected an output of shape (4, 3)"));
  REQUIRE_THROWS_WITH(pg->all_gather(zeros({4, 3}, DType::bf16), x), ContainsSubstring("[all_gather] expected input and output of one dtype"));
  REQUIRE_THROWS_WITH(pg->all_gather(zeros({3, 4}).t(), x), ContainsSubstring("[all_gather] expected a contiguous output"));
  REQUIRE_THROWS_WITH(pg->reduce_scatter(zeros({4, 3}, DType::u8), zeros({4, 3}, DType::u8)),
                      ContainsSubstring("[reduce_scatter] expected f32, bf16, f64 or i64, found u8"));
  REQUIRE_THROWS_WITH(pg->reduce_scatter(zeros({2, 3}), x), ContainsSubstring("[reduce_scatter] expected an input of shape (2, 3)"));
  REQUIRE_THROWS_WITH(pg->all_reduce(zeros({3}, DType::i32)), ContainsSubstring("[all_reduce] expected f32, bf16, f64 or i64"));
  REQUIRE_THROWS_WITH(pg->broadcast(x, 1), ContainsSubstring("[broadcast] expected a root in [0, 1), found 1"));
  Tensor leaf = zeros({3});
  leaf.set_requires_grad();
  REQUIRE_THROWS_WITH(pg->all_reduce(leaf), ContainsSubstring("[all_reduce] collectives write in place"));
  REQUIRE_THROWS_WITH(pg->all_gather(Tensor(), x), ContainsSubstring("[all_gather] expected a defined output"));
  // The group still works after refused calls (they never reached the other ranks).
  Tensor y = ones({2});
  pg->all_reduce(y).wait();
  REQUIRE(y.to_vector<float>() == std::vector<float>{1, 1});
}

TEST_CASE("local calls that differ across ranks fail on every rank with one clear error", "[dist]") {
  struct Case {
    const char* expect;
    std::function<void(dist::ProcessGroup&)> call;
  };
  const std::vector<Case> cases = {
      {"[all_gather] rank 1 gave 12 bytes, rank 0 gave 16",
       [](dist::ProcessGroup& pg) {
         const int n = pg.rank() == 0 ? 4 : 3;
         pg.all_gather(empty({2 * n}, DType::f32), empty({n}, DType::f32)).wait();
       }},
      {"rank 1 gave bf16, rank 0 gave f32",
       [](dist::ProcessGroup& pg) { pg.all_reduce(zeros({4}, pg.rank() == 0 ? DType::f32 : DType::bf16)).wait(); }},
      {"rank 1 called broadcast as collective #0, rank 0 called all_reduce",
       [](dist::ProcessGroup& pg) {
         if (pg.rank() == 0) pg.all_reduce(zeros({4})).wait();
         else pg.broadcast(zeros({4})).wait();
       }},
      {"rank 1 asked for max, rank 0 for sum",
       [](dist::ProcessGroup& pg) { pg.all_reduce(zeros({4}), pg.rank() == 0 ? dist::ReduceOp::sum : dist::ReduceOp::max).wait(); }},
      {"rank 1 named root 1, rank 0 root 0", [](dist::ProcessGroup& pg) { pg.broadcast(zeros({4}), pg.rank()).wait(); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.expect);
    Errors errors(2);
    dist::run_local(2, [&](dist::ProcessGroup& pg) {
      // Rank 1 arrives second, so its call is the one compared with rank 0's.
      if (pg.rank() == 1) std::this_thread::sleep_for(milliseconds(20));
      try {
        c.call(pg);
      } catch (const Error& e) {
        errors.set(pg.rank(), e.what());
      }
    });
    for (const std::string& e : errors.by_rank) REQUIRE_THAT(e, ContainsSubstring(c.expect));
  }
}

TEST_CASE("local: a rank that stalls makes the others fail within the timeout, naming it", "[dist]") {
  const int world = 3;
  Errors errors(world);
  std::vector<double> seconds(world, 0.0);
  const auto timeout = milliseconds(300);
  REQUIRE_THROWS_WITH(dist::run_local(world,
                                      [&](dist::ProcessGroup& pg) {
                                        Tensor x = ones({8});
                                        pg.all_reduce(x).wait();  // collective #0: everyone
                                        if (pg.rank() == 2) std::this_thread::sleep_for(milliseconds(900));
                                        const auto start = Clock::now();
                                        try {
                                          pg.all_reduce(x).wait();  // collective #1: rank 2 is late
                                        } catch (const Error& e) {
                                          seconds[static_cast<size_t>(pg.rank())] =
                                              std::chrono::duration<double>(Clock::now() - start).count();
                                          errors.set(pg.rank(), e.what());
                                          throw;
                                        }
                                      },
                                      timeout),
                      ContainsSubstring("timed out after 300 ms in collective #1: rank 2 has not joined it (its last "
                                        "collective is #0)"));
  for (int r : {0, 1}) {
    REQUIRE_THAT(errors.by_rank[static_cast<size_t>(r)], ContainsSubstring("rank 2 has not joined it"));
    REQUIRE(seconds[static_cast<size_t>(r)] < 0.8);  // the timeout, not rank 2's 0.9 s
  }
  REQUIRE_THAT(errors.by_rank[2], ContainsSubstring("the process group was aborted"));
}

TEST_CASE("local: a rank that fails or leaves ends the others' collectives at once", "[dist]") {
  for (bool throws : {true, false}) {
    CAPTURE(throws);
    Errors errors(3);
    const auto start = Clock::now();
    auto run = [&] {
      dist::run_local(3, [&](dist::ProcessGroup& pg) {
        if (pg.rank() == 1) {
          std::this_thread::sleep_for(milliseconds(50));
          if (throws) throw Error("[my_step] something broke");
          return;  // leaves without joining the all_reduce
        }
        try {
          Tensor x = ones({8});
          pg.all_reduce(x).wait();
        } catch (const Error& e) {
          errors.set(pg.rank(), e.what());
          throw;
        }
      }, std::chrono::seconds(30));
    };
    if (throws) REQUIRE_THROWS_WITH(run(), ContainsSubstring("[run_local] rank 1 failed: [my_step] something broke"));
    else REQUIRE_THROWS_WITH(run(), ContainsSubstring("rank 1 left the group"));
    REQUIRE(std::chrono::duration<double>(Clock::now() - start).count() < 5.0);  // not the 30 s timeout
    for (int r : {0, 2}) {
      REQUIRE_THAT(errors.by_rank[static_cast<size_t>(r)], ContainsSubstring(throws ? "rank 1 failed" : "rank 1 left"));
    }
  }
}

TEST_CASE("local groups share a store: check_same names the rank whose setting differs", "[dist]") {
  Errors errors(3);
  dist::run_local(3, [&](dist::ProcessGroup& pg) {
    auto store = pg.store();
    REQUIRE(store != nullptr);
    dist::check_same(*store, pg.rank(), pg.size(), "lr", "0.001", milliseconds(2000));  // all agree
    try {
      dist::check_same(*store, pg.rank(), pg.size(), "lr", pg.rank() == 2 ? "0.002" : "0.001", milliseconds(2000));
    } catch (const Error& e) {
      errors.set(pg.rank(), e.what());
    }
  });
  for (const std::string& e : errors.by_rank)
    REQUIRE_THAT(e, ContainsSubstring("[check_same] setting 'lr' differs across ranks: rank 2 has '0.002', rank 0 has '0.001'"));
}

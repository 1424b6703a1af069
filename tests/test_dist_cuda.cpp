// dist/ on a GPU: the local backend with every rank's tensors on one device (device copies and the
// reduce kernel on the collective stream, ordered after each rank's own stream by events) against the
// CPU references bit for bit, and an NCCL group of one. SKIP without a GPU.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <algorithm>
#include <thread>

#include "core/cuda/runtime.h"
#include "dist/config.h"
#include "dist/local.h"
#include "dist/nccl_group.h"
#include "tests/helpers.h"
#include "tests/test_dist_common.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;
using kiln::test::dist_compare;
using kiln::test::dist_input;
using kiln::test::dist_reference_reduce;

namespace {

const Device kGPU{DeviceType::cuda, 0};

Shape stacked(const Shape& shard, int world) {
  if (shard.empty()) return {world};
  Shape s = shard;
  s[0] *= world;
  return s;
}

// Every collective on `pg` for a rank whose tensors live on `device`, checked against the references;
// each rank works on its own non-default stream so the events must order it. Returns what failed.
std::string check_collectives(dist::ProcessGroup& pg, Device device) {
  const int world = pg.size(), rank = pg.rank();
  cuda::Stream mine = cuda::Stream::create(device.index);
  cuda::StreamGuard guard(mine);
  for (DType dtype : {DType::f32, DType::bf16, DType::f64, DType::i64}) {
    for (const Shape& shard : std::vector<Shape>{{}, {0, 3}, {5, 3}, {70001}}) {
      std::vector<Tensor> all;
      for (int r = 0; r < world; ++r) all.push_back(dist_input(r, stacked(shard, world), dtype, 7));
      // all_gather of each rank's first shard
      std::vector<Tensor> shards;
      for (int r = 0; r < world; ++r) shards.push_back(all[static_cast<size_t>(r)].narrow(0, 0, shard.empty() ? 1 : shard[0]).reshape(shard));
      Tensor gathered = empty(stacked(shard, world), dtype, device);
      pg.all_gather(gathered, shards[static_cast<size_t>(rank)].to(device)).wait();
      std::string d = dist_compare(gathered, shard.empty() ? stack(shards, 0) : cat(shards, 0));
      if (!d.empty()) return std::string("all_gather ") + dtype_name(dtype) + ": " + d;
      // reduce_scatter
      Tensor out = empty(shard, dtype, device);
      pg.reduce_scatter(out, all[static_cast<size_t>(rank)].to(device)).wait();
      const int64_t n = shard.empty() ? 1 : shard[0];
      d = dist_compare(out, dist_reference_reduce(all, false).narrow(0, rank * n, n).reshape(shard));
      if (!d.empty()) return std::string("reduce_scatter ") + dtype_name(dtype) + ": " + d;
      // all_reduce sum and max (a NaN on the last rank)
      for (bool max : {false, true}) {
        std::vector<Tensor> ins;
        for (int r = 0; r < world; ++r)
          ins.push_back(dist_input(r, shard, dtype, 8, max && is_floating(dtype) && r == world - 1 ? 0 : -1));
        Tensor t = ins[static_cast<size_t>(rank)].to(device);
        pg.all_reduce(t, max ? dist::ReduceOp::max : dist::ReduceOp::sum).wait();
        d = dist_compare(t, dist_reference_reduce(ins, max));
        if (!d.empty()) return std::string("all_reduce ") + (max ? "max " : "sum ") + dtype_name(dtype) + ": " + d;
      }
    }
  }
  Tensor b = dist_input(rank, {1000, 3}, DType::u8, 9).to(device);
  pg.broadcast(b, world - 1).wait();
  std::string d = dist_compare(b, dist_input(world - 1, {1000, 3}, DType::u8, 9));
  if (!d.empty()) return "broadcast: " + d;
  pg.barrier().wait();
  return "";
}

}  // namespace

TEST_CASE("local backend on one GPU: every collective matches the CPU reference", "[cuda][dist]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  for (int world = 1; world <= 4; ++world) {
    CAPTURE(world);
    std::vector<std::string> failures(static_cast<size_t>(world));
    dist::run_local(world, [&](dist::ProcessGroup& pg) { failures[static_cast<size_t>(pg.rank())] = check_collectives(pg, kGPU); });
    for (const std::string& f : failures) REQUIRE(f == "");
  }
}

TEST_CASE("local backend on one GPU: Work::wait orders the caller's stream after the collective", "[cuda][dist]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  const int world = 3;
  const int64_t n = 1 << 24;  // 64 MB per rank: long enough that a missing fence would show
  std::vector<std::vector<float>> got(world);
  dist::run_local(world, [&](dist::ProcessGroup& pg) {
    cuda::Stream mine = cuda::Stream::create();
    cuda::StreamGuard guard(mine);
    Tensor x = full({n}, pg.rank() + 1.0, DType::f32, kGPU);  // queued on this rank's stream
    pg.all_reduce(x).wait();
    Tensor s = sum(x) / static_cast<double>(n);  // queued after the wait on the same stream
    got[static_cast<size_t>(pg.rank())] = s.to(kCPU).to_vector<float>();
  });
  for (const auto& g : got) REQUIRE(g == std::vector<float>{6.0f});
}

TEST_CASE("local backend refuses ranks on different devices", "[cuda][dist]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  std::vector<std::string> errors(2);
  dist::run_local(2, [&](dist::ProcessGroup& pg) {
    try {
      Tensor x = ones({4}, DType::f32, pg.rank() == 0 ? kGPU : kCPU);
      if (pg.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      pg.all_reduce(x).wait();
    } catch (const Error& e) {
      errors[static_cast<size_t>(pg.rank())] = e.what();
    }
  });
  for (const std::string& e : errors) REQUIRE_THAT(e, ContainsSubstring("rank 1 gave a cpu tensor, rank 0 a cuda tensor"));
}

TEST_CASE("NCCL group of one: every collective on the group's stream", "[cuda][dist][nccl]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  if (!KILN_WITH_NCCL) SKIP("built without NCCL");
  auto store = std::make_shared<dist::TcpStore>("127.0.0.1", 0, 0, 1, true, std::chrono::seconds(30));
  auto pg = dist::make_nccl_group(store, 0, std::chrono::seconds(30));
  REQUIRE(pg->backend() == "nccl");
  REQUIRE(check_collectives(*pg, kGPU) == "");
  REQUIRE_THROWS_WITH(pg->all_reduce(ones({2})), ContainsSubstring("does not take tensors on cpu"));
}

TEST_CASE("NCCL processes (one GPU each): collectives, and a stalled or vanished rank named by the others",
          "[cuda][dist][nccl]") {
  if (!cuda::is_available()) SKIP("no CUDA device");
  if (!KILN_WITH_NCCL) SKIP("built without NCCL");
  if (cuda::device_count() < 2) SKIP("NCCL needs a GPU per rank: fewer than 2 visible");
  const int world = std::min(cuda::device_count(), 4);
  {
    test::OutDir out;
    REQUIRE(test::run_workers(world, "collectives", "nccl", 60000) == 0);
    for (int r = 0; r < world; ++r) REQUIRE(out.read("rank" + std::to_string(r) + ".txt") == "ok");
  }
  {
    test::OutDir out;
    REQUIRE(test::run_workers(2, "mismatch", "nccl", 20000) == 0);
    for (int r : {0, 1})
      REQUIRE_THAT(out.read("rank" + std::to_string(r) + ".txt"), ContainsSubstring("rank 1 gave 12 bytes, rank 0 gave 16"));
  }
  for (const char* scenario : {"stall", "vanish"}) {
    CAPTURE(scenario);
    test::OutDir out;
    REQUIRE(test::run_workers(world, scenario, "nccl", 3000) == 0);
    const std::string last = std::to_string(world - 1);
    for (int r = 0; r + 1 < world; ++r) {
      const std::string got = out.read("rank" + std::to_string(r) + ".txt");
      CAPTURE(r, got);
      REQUIRE_THAT(got, ContainsSubstring("rank " + last));
    }
  }
}

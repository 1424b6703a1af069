// dist/ across real processes: dist::launch (the variables it sets, a failing rank ends the others,
// signals passed on, a program that cannot run), and the Gloo backend through tests/test_dist_worker
// started by launch with 2-3 ranks: every collective against its reference, and the failure paths
// (a rank that stalls or vanishes, calls that differ, settings that differ) named on every rank.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "dist/config.h"
#include "dist/launch.h"
#include "tests/test_dist_common.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

dist::LaunchOptions local_launch(int nproc, std::chrono::milliseconds grace = std::chrono::seconds(5)) {
  dist::LaunchOptions o;
  o.nproc = nproc;
  o.grace = grace;
  return o;
}

}  // namespace

TEST_CASE("launch starts nproc ranks with the variables dist::init reads", "[dist]") {
  test::OutDir out;
  const int rc = dist::launch(local_launch(3), {"sh", "-c",
      "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\" > \"$KILN_TEST_OUT/$RANK\""});
  REQUIRE(rc == 0);
  std::string port;
  for (int r = 0; r < 3; ++r) {
    std::istringstream in(out.read(std::to_string(r)));
    int rank = -1, world = 0, local = -1, local_world = 0;
    std::string addr, p;
    in >> rank >> world >> local >> local_world >> addr >> p;
    REQUIRE((rank == r && world == 3 && local == r && local_world == 3 && addr == "127.0.0.1"));
    REQUIRE(std::stoi(p) > 0);
    if (r > 0) REQUIRE(p == port);  // one free port for all
    port = p;
  }
  dist::LaunchOptions multi = local_launch(2);
  multi.nnodes = 2;
  multi.node_rank = 1;
  multi.master_addr = "10.0.0.1";
  multi.master_port = 4321;
  REQUIRE(dist::launch(multi, {"sh", "-c", "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR:$MASTER_PORT\" > \"$KILN_TEST_OUT/n$RANK\""}) == 0);
  REQUIRE(out.read("n2") == "2 4 0 10.0.0.1:4321\n");
  REQUIRE(out.read("n3") == "3 4 1 10.0.0.1:4321\n");
}

TEST_CASE("launch ends every rank when one fails and returns its status", "[dist]") {
  const auto start = Clock::now();
  const int rc = dist::launch(local_launch(3, std::chrono::milliseconds(500)),
                              {"sh", "-c", "if [ \"$RANK\" = 1 ]; then sleep 0.1; exit 3; fi; exec sleep 30"});
  REQUIRE(rc == 3);
  REQUIRE(seconds_since(start) < 5.0);
  // A rank that ignores SIGTERM is killed after the grace period.
  const int rc2 = dist::launch(local_launch(2, std::chrono::milliseconds(300)),
                               {"sh", "-c", "if [ \"$RANK\" = 0 ]; then exit 4; fi; trap '' TERM; sleep 30"});
  REQUIRE(rc2 == 4);
  REQUIRE(seconds_since(start) < 8.0);
}

TEST_CASE("launch passes SIGTERM on to its ranks", "[dist]") {
  const auto start = Clock::now();
  std::thread sender([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ::kill(::getpid(), SIGTERM);  // launch's handler catches it while the ranks run
  });
  const int rc = dist::launch(local_launch(2), {"sh", "-c", "exec sleep 30"});
  sender.join();
  REQUIRE(rc == 128 + SIGTERM);
  REQUIRE(seconds_since(start) < 5.0);
}

TEST_CASE("launch refuses a program that cannot run", "[dist]") {
  REQUIRE_THROWS_WITH(dist::launch(local_launch(2), {"kiln-no-such-program"}), ContainsSubstring("not found in PATH"));
  REQUIRE_THROWS_WITH(dist::launch(local_launch(2), {"/etc/hostname"}), ContainsSubstring("could not run '/etc/hostname'"));
  REQUIRE_THROWS_WITH(dist::launch(local_launch(0), {"true"}), ContainsSubstring("expected --nproc >= 1"));
}

#if KILN_WITH_GLOO

namespace {

int error_ms(const std::string& result) { return std::atoi(result.c_str() + std::string("error after ").size()); }

}  // namespace

TEST_CASE("gloo processes: every collective matches the reference", "[dist]") {
  for (int world : {2, 3}) {
    CAPTURE(world);
    test::OutDir out;
    REQUIRE(test::run_workers(world, "collectives", "gloo", 20000) == 0);
    for (int r = 0; r < world; ++r) REQUIRE(out.read("rank" + std::to_string(r) + ".txt") == "ok");
  }
}

TEST_CASE("gloo processes: a rank that stalls makes the others fail within the timeout, naming it", "[dist]") {
  test::OutDir out;
  REQUIRE(test::run_workers(3, "stall", "gloo", 1000) == 0);
  for (int r : {0, 1}) {
    const std::string got = out.read("rank" + std::to_string(r) + ".txt");
    CAPTURE(r, got);
    REQUIRE_THAT(got, ContainsSubstring("rank 2 has not joined it (its last collective is #0)"));
    REQUIRE(error_ms(got) < 2400);  // the 1 s timeout (+ start-up), not rank 2's 2.5 s stall
  }
  REQUIRE_THAT(out.read("rank2.txt"), ContainsSubstring("error"));
}

TEST_CASE("gloo processes: a rank that vanishes makes the others fail at once, naming it", "[dist]") {
  test::OutDir out;
  REQUIRE(test::run_workers(3, "vanish", "gloo", 20000) == 0);
  REQUIRE(out.read("rank2.txt") == "vanished");
  for (int r : {0, 1}) {
    const std::string got = out.read("rank" + std::to_string(r) + ".txt");
    CAPTURE(r, got);
    REQUIRE_THAT(got, ContainsSubstring("rank 2 went missing"));
    REQUIRE(error_ms(got) < 10000);  // well inside the 20 s timeout
  }
}

TEST_CASE("gloo processes: calls or settings that differ across ranks fail on every rank", "[dist]") {
  {
    test::OutDir out;
    REQUIRE(test::run_workers(2, "mismatch", "gloo", 20000) == 0);
    for (int r : {0, 1})
      REQUIRE_THAT(out.read("rank" + std::to_string(r) + ".txt"),
                   ContainsSubstring("[all_gather] rank 1 gave 12 bytes, rank 0 gave 16 (collective #1)"));
  }
  {
    test::OutDir out;
    REQUIRE(test::run_workers(3, "settings", "gloo", 20000) == 0);
    for (int r : {0, 1, 2})
      REQUIRE_THAT(out.read("rank" + std::to_string(r) + ".txt"),
                   ContainsSubstring("[check_same] setting 'config' differs across ranks: rank 2 has 'b', rank 0 has 'a'"));
  }
}

#endif

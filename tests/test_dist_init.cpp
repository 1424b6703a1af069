// dist::init and read_environment: torchrun, Slurm and Open MPI variables (set in this process), their
// errors, MASTER_ADDR/MASTER_PORT, a world of one with no variables and no network, explicit backends.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <cstdlib>
#include <map>

#include "core/ops.h"
#include "dist/config.h"
#include "dist/init.h"
#include "dist/store.h"

using namespace kiln;
using Catch::Matchers::ContainsSubstring;

namespace {

// Sets the given variables (and clears every other launcher variable) for the scope.
class EnvScope {
 public:
  explicit EnvScope(const std::map<std::string, std::string>& vars) {
    static const char* kNames[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                   "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
                                   "SLURM_TASKS_PER_NODE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                   "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "KILN_DIST_TIMEOUT"};
    for (const char* n : kNames) {
      const char* v = std::getenv(n);
      if (v != nullptr) saved_[n] = v;
      else saved_[n] = std::nullopt;
      ::unsetenv(n);
    }
    for (const auto& [k, v] : vars) ::setenv(k.c_str(), v.c_str(), 1);
  }
  ~EnvScope() {
    for (const auto& [k, v] : saved_) {
      if (v) ::setenv(k.c_str(), v->c_str(), 1);
      else ::unsetenv(k.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

}  // namespace

TEST_CASE("read_environment understands torchrun, Slurm and Open MPI", "[dist]") {
  {
    EnvScope env({});
    dist::Environment e = dist::read_environment();
    REQUIRE(e.source == "none");
    REQUIRE(e.rank == 0);
    REQUIRE(e.world_size == 1);
    REQUIRE(e.master_addr == "127.0.0.1");
    REQUIRE(e.master_port == 29500);
  }
  {
    EnvScope env({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "4"},
                  {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "1234"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}});
    dist::Environment e = dist::read_environment();  // torchrun's variables win over Slurm's
    REQUIRE(e.source == "torchrun");
    REQUIRE((e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && e.local_world_size == 4));
    REQUIRE((e.master_addr == "node7" && e.master_port == 1234));
  }
  {
    EnvScope env({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "0"}, {"SLURM_TASKS_PER_NODE", "3(x2)"}});
    dist::Environment e = dist::read_environment();
    REQUIRE(e.source == "slurm");
    REQUIRE((e.rank == 3 && e.world_size == 6 && e.local_rank == 0 && e.local_world_size == 3));
  }
  {
    EnvScope env({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                  {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
    dist::Environment e = dist::read_environment();
    REQUIRE(e.source == "openmpi");
    REQUIRE((e.rank == 1 && e.world_size == 2 && e.local_rank == 1 && e.local_world_size == 2));
  }
}

TEST_CASE("read_environment rejects malformed or inconsistent variables", "[dist]") {
  struct Case {
    std::map<std::string, std::string> vars;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {{{"RANK", "0"}}, "expected both RANK and WORLD_SIZE, found only RANK"},
      {{{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK=2 is out of range for WORLD_SIZE=2"},
      {{{"RANK", "abc"}, {"WORLD_SIZE", "2"}}, "RANK='abc' is not a non-negative integer"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}, "MASTER_PORT=70000 is not a port"},
      {{{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}}, "SLURM_PROCID=4 is out of range for SLURM_NTASKS=4"},
      {{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "3"}, {"LOCAL_WORLD_SIZE", "2"}}, "local rank 3 is out of range"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.expect);
    EnvScope env(c.vars);
    REQUIRE_THROWS_WITH(dist::read_environment(), ContainsSubstring(std::string("[dist init] ") + c.expect));
  }
}

TEST_CASE("init without variables is a world of one on the local backend", "[dist]") {
  EnvScope env({});
  dist::InitOptions o;
  o.device = kCPU;
  o.same_settings = {{"config", "abc"}};
  dist::World w = dist::init(o);
  REQUIRE(w.rank() == 0);
  REQUIRE(w.size() == 1);
  REQUIRE(w.group->backend() == "local");
  REQUIRE(w.device == kCPU);
  Tensor x = full({3}, 2.5);
  w.group->all_reduce(x).wait();
  REQUIRE(x.to_vector<float>() == std::vector<float>{2.5f, 2.5f, 2.5f});
  Tensor out = empty({3});
  w.group->all_gather(out, x).wait();
  REQUIRE(out.to_vector<float>() == std::vector<float>{2.5f, 2.5f, 2.5f});
}

TEST_CASE("init checks its options", "[dist]") {
  EnvScope env({{"RANK", "0"}, {"WORLD_SIZE", "2"}});
  dist::InitOptions o;
  o.device = kCPU;
  o.backend = "mpi";
  REQUIRE_THROWS_WITH(dist::init(o), ContainsSubstring("expected backend auto, local, gloo or nccl, found 'mpi'"));
  o.backend = "local";
  REQUIRE_THROWS_WITH(dist::init(o), ContainsSubstring("the local backend runs ranks as threads"));
  o.backend = "nccl";
  REQUIRE_THROWS_WITH(dist::init(o), ContainsSubstring("the nccl backend needs a CUDA device, found cpu"));
}

TEST_CASE("init from torchrun variables with an explicit gloo backend, world of one", "[dist]") {
  EnvScope env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}});
  dist::InitOptions o;
  o.backend = "gloo";
  o.device = kCPU;
  o.timeout = std::chrono::seconds(5);
  if (!KILN_WITH_GLOO) {
    REQUIRE_THROWS_WITH(dist::init(o), ContainsSubstring("no Gloo backend"));
    return;
  }
  dist::World w = dist::init(o);
  REQUIRE(w.group->backend() == "gloo");
  REQUIRE(w.env.source == "torchrun");
  Tensor x = full({4}, 3.0, DType::bf16);
  w.group->all_reduce(x, dist::ReduceOp::max).wait();
  REQUIRE(x.to(DType::f32).to_vector<float>() == std::vector<float>(4, 3.0f));
  w.group->barrier().wait();
}

TEST_CASE("KILN_DIST_TIMEOUT sets every collective's and store wait's timeout, over the program's", "[dist]") {
  using std::chrono::milliseconds;
  dist::InitOptions o;
  o.device = kCPU;
  o.timeout = std::chrono::seconds(600);
  {
    EnvScope env(std::map<std::string, std::string>{{"KILN_DIST_TIMEOUT", "2.5"}});
    REQUIRE(dist::read_environment().timeout == milliseconds(2500));
    REQUIRE(dist::init(o).group->timeout() == milliseconds(2500));
  }
  if (KILN_WITH_GLOO) {  // a group made through the store takes it too
    EnvScope env({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"KILN_DIST_TIMEOUT", "90"}});
    o.backend = "gloo";
    REQUIRE(dist::init(o).group->timeout() == milliseconds(90000));
    o.backend = "auto";
  }
  {
    EnvScope env({});
    REQUIRE_FALSE(dist::read_environment().timeout.has_value());
    REQUIRE(dist::init(o).group->timeout() == milliseconds(600000));
  }
  {
    EnvScope env(std::map<std::string, std::string>{{"KILN_DIST_TIMEOUT", ""}});  // empty: not set, as the launcher variables
    REQUIRE_FALSE(dist::read_environment().timeout.has_value());
  }
  for (const char* bad : {"abc", "0", "-3", "inf", "nan", "5s"}) {
    INFO("KILN_DIST_TIMEOUT='" << bad << "'");
    EnvScope env(std::map<std::string, std::string>{{"KILN_DIST_TIMEOUT", bad}});
    REQUIRE_THROWS_WITH(dist::read_environment(), ContainsSubstring("[dist init]") &&
                                                      ContainsSubstring(std::string("KILN_DIST_TIMEOUT='") + bad + "'"));
  }
}

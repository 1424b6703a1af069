// Reading the launcher's variables, choosing the backend and device, the store rendezvous and the
// start-up check that every rank runs with the same settings.
#include "dist/init.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "core/cuda/runtime.h"
#include "dist/gloo_group.h"
#include "dist/local.h"
#include "dist/nccl_group.h"
#include "dist/tcp_store.h"

namespace kiln::dist {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

int parse_int(const char* name, const char* value) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value, &end, 10);
  KILN_CHECK(errno == 0 && end != value && *end == '\0' && v >= 0 && v <= 1 << 30, "dist init",
             "{}='{}' is not a non-negative integer", name, value);
  return static_cast<int>(v);
}

// Seconds > 0 (fractions allowed) as milliseconds, at least 1.
std::chrono::milliseconds parse_seconds(const char* name, const char* value) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(value, &end);
  KILN_CHECK(errno == 0 && end != value && *end == '\0' && std::isfinite(v) && v > 0 && v <= 1e7, "dist init",
             "{}='{}': expected a number of seconds > 0 (at most 1e7)", name, value);
  return std::chrono::milliseconds(std::max<int64_t>(1, std::llround(v * 1000.0)));
}

int env_int(const char* name, int fallback) {
  const char* v = env(name);
  return v != nullptr ? parse_int(name, v) : fallback;
}

// Slurm's SLURM_TASKS_PER_NODE looks like "4(x2),3": the first node's count.
int slurm_tasks_per_node(int fallback) {
  if (const char* v = env("SLURM_NTASKS_PER_NODE")) return parse_int("SLURM_NTASKS_PER_NODE", v);
  const char* v = env("SLURM_TASKS_PER_NODE");
  if (v == nullptr) return fallback;
  std::string s(v);
  s = s.substr(0, s.find_first_of("(,"));
  return parse_int("SLURM_TASKS_PER_NODE", s.c_str());
}

}  // namespace

Environment read_environment() {
  Environment e;
  const char *rank_name = nullptr, *size_name = nullptr;
  if (env("RANK") || env("WORLD_SIZE")) {
    KILN_CHECK(env("RANK") && env("WORLD_SIZE"), "dist init", "expected both RANK and WORLD_SIZE, found only {}",
               env("RANK") ? "RANK" : "WORLD_SIZE");
    e.source = "torchrun";
    rank_name = "RANK";
    size_name = "WORLD_SIZE";
    e.rank = parse_int("RANK", env("RANK"));
    e.world_size = parse_int("WORLD_SIZE", env("WORLD_SIZE"));
    e.local_rank = env_int("LOCAL_RANK", e.rank);
    e.local_world_size = env_int("LOCAL_WORLD_SIZE", e.world_size);
  } else if (env("SLURM_PROCID") && env("SLURM_NTASKS")) {
    e.source = "slurm";
    rank_name = "SLURM_PROCID";
    size_name = "SLURM_NTASKS";
    e.rank = parse_int("SLURM_PROCID", env("SLURM_PROCID"));
    e.world_size = parse_int("SLURM_NTASKS", env("SLURM_NTASKS"));
    e.local_rank = env_int("SLURM_LOCALID", 0);
    e.local_world_size = slurm_tasks_per_node(1);
  } else if (env("OMPI_COMM_WORLD_RANK") && env("OMPI_COMM_WORLD_SIZE")) {
    e.source = "openmpi";
    rank_name = "OMPI_COMM_WORLD_RANK";
    size_name = "OMPI_COMM_WORLD_SIZE";
    e.rank = parse_int("OMPI_COMM_WORLD_RANK", env("OMPI_COMM_WORLD_RANK"));
    e.world_size = parse_int("OMPI_COMM_WORLD_SIZE", env("OMPI_COMM_WORLD_SIZE"));
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    e.local_world_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  }
  if (rank_name != nullptr) {
    KILN_CHECK(e.world_size >= 1, "dist init", "{}=0: expected at least one rank", size_name);
    KILN_CHECK(e.rank < e.world_size, "dist init", "{}={} is out of range for {}={}", rank_name, e.rank, size_name,
               e.world_size);
    KILN_CHECK(e.local_world_size >= 1 && e.local_rank < e.local_world_size, "dist init",
               "local rank {} is out of range for a local world size of {}", e.local_rank, e.local_world_size);
  }
  if (const char* t = env("KILN_DIST_TIMEOUT")) e.timeout = parse_seconds("KILN_DIST_TIMEOUT", t);
  if (const char* a = env("MASTER_ADDR")) e.master_addr = a;
  if (const char* p = env("MASTER_PORT")) {
    e.master_port = parse_int("MASTER_PORT", p);
    KILN_CHECK(e.master_port >= 1 && e.master_port <= 65535, "dist init", "MASTER_PORT={} is not a port (1-65535)",
               e.master_port);
  }
  return e;
}

World init(const InitOptions& options) {
  World w;
  w.env = read_environment();
  const std::chrono::milliseconds timeout = w.env.timeout.value_or(options.timeout);
  const std::string& b = options.backend;
  KILN_CHECK(b == "auto" || b == "local" || b == "gloo" || b == "nccl", "dist init",
             "expected backend auto, local, gloo or nccl, found '{}'", b);
  if (options.device) {
    w.device = *options.device;
  } else if ((b == "auto" || b == "nccl") && cuda::is_available()) {
    w.device = Device(DeviceType::cuda, w.env.local_rank % cuda::device_count());
  }
  if (w.device.is_cuda()) cuda::set_device(w.device.index);
  std::string backend = b;
  if (backend == "auto") backend = w.env.world_size == 1 ? "local" : w.device.is_cuda() ? "nccl" : "gloo";
  KILN_CHECK(backend != "local" || w.env.world_size == 1, "dist init",
             "the local backend runs ranks as threads (dist::run_local); a launcher started {} processes", w.env.world_size);
  KILN_CHECK(backend != "nccl" || w.device.is_cuda(), "dist init", "the nccl backend needs a CUDA device, found {}",
             w.device.str());
  KILN_CHECK(backend != "gloo" || w.device.is_cpu(), "dist init", "the gloo backend takes CPU tensors, found {}",
             w.device.str());
  if (backend == "local") {
    w.group = make_local_groups(1, timeout)[0];
    for (const auto& [k, v] : options.same_settings) check_same(*w.group->store(), 0, 1, k, v, timeout);
    return w;
  }
  // A world of one with an explicit gloo/nccl backend meets itself on a free loopback port.
  const bool alone = w.env.world_size == 1;
  auto store = std::make_shared<TcpStore>(alone ? "127.0.0.1" : w.env.master_addr, alone ? 0 : w.env.master_port,
                                          w.env.rank, w.env.world_size, w.env.rank == 0, timeout);
  const int rank = w.env.rank, size = w.env.world_size;
  check_same(*store, rank, size, "world_size", std::to_string(size), timeout);
  check_same(*store, rank, size, "backend", backend, timeout);
  check_same(*store, rank, size, "device_type", w.device.is_cuda() ? "cuda" : "cpu", timeout);
  check_same(*store, rank, size, "timeout_ms", std::to_string(timeout.count()), timeout);
  for (const auto& [k, v] : options.same_settings) check_same(*store, rank, size, k, v, timeout);
  w.group = backend == "gloo" ? make_gloo_group(store, timeout)
                              : make_nccl_group(store, w.device.index, timeout, "default", options.check_calls);
  return w;
}

}  // namespace kiln::dist

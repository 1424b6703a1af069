// dist::init: joins the job this process was launched into. Reads rank and world size from torchrun's
// variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), Slurm's (SLURM_PROCID, SLURM_NTASKS,
// SLURM_LOCALID) or Open MPI's (OMPI_COMM_WORLD_*), meets the other ranks at MASTER_ADDR:MASTER_PORT
// (default 127.0.0.1:29500), checks that they agree on their settings and makes the process group.
#pragma once
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "dist/process_group.h"

namespace kiln::dist {

struct Environment {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "none";  // "torchrun" (or kiln launch), "slurm", "openmpi", "none" (a world of one)
  // KILN_DIST_TIMEOUT (seconds, e.g. "120" or "2.5"): the timeout of every collective and store wait,
  // over InitOptions::timeout (a hang then ends, naming the missing rank, within a job's time limit).
  std::optional<std::chrono::milliseconds> timeout;
};
// Throws kiln::Error "[dist init] ..." on malformed or inconsistent values.
Environment read_environment();

struct InitOptions {
  // "auto": local for a world of one, nccl for CUDA devices, gloo for the CPU; or "local" (a world of
  // one only), "gloo", "nccl".
  std::string backend = "auto";
  // Default: cuda:<local rank % devices> where a GPU is visible and the backend is auto or nccl, else cpu.
  std::optional<Device> device;
  std::chrono::milliseconds timeout = kDefaultTimeout;  // every collective and store wait (KILN_DIST_TIMEOUT wins)
  // NCCL: exchange a 24-byte record per collective so calls that differ across ranks fail clearly
  // (one small all_gather more each); the local and Gloo backends always check.
  bool check_calls = true;
  // (name, value) pairs every rank must agree on (a config hash, the model path); checked at start.
  std::vector<std::pair<std::string, std::string>> same_settings;
};

struct World {
  Environment env;
  Device device;  // where this rank's tensors live (the current CUDA device is set to it)
  std::shared_ptr<ProcessGroup> group;
  int rank() const { return env.rank; }
  int size() const { return env.world_size; }
};

// A world of one (no variables set) needs no network.
World init(const InitOptions& options = {});

}  // namespace kiln::dist

// launch: the spawning half of `kiln launch` and `kiln finetune --nproc` (their flags: examples/kiln): starts
// nproc copies of a program with the variables dist::init reads, passes SIGINT/SIGTERM on to them,
// and ends every rank as soon as one fails. Children's output is not touched (rank 0 prints).
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace kiln::dist {

struct LaunchOptions {
  int nproc = 1;      // processes on this node (LOCAL_WORLD_SIZE)
  int nnodes = 1;
  int node_rank = 0;  // RANK = node_rank * nproc + local rank
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: a free port on a single node, 29500 across nodes
  // After a rank failed or a signal was passed on, how long the others get before SIGKILL.
  std::chrono::milliseconds grace = std::chrono::seconds(10);
};

// Runs argv[0] (searched in PATH) with argv[1:] as nproc processes and waits for them. Returns 0
// when all succeeded, else the status of the first rank that failed (its exit code, 128 + signal
// number if killed), after printing which rank failed to stderr. Throws kiln::Error on bad options
// or a program that cannot be run.
int launch(const LaunchOptions& options, const std::vector<std::string>& argv);

}  // namespace kiln::dist

// The local backend: N ranks as threads of one process, on the CPU (copies and reduce loops) or
// sharing one GPU (device copies and a reduce kernel on a high-priority collective stream). It runs
// the same code as the Gloo and NCCL groups in tests and CI, without processes or a network.
#pragma once
#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "dist/process_group.h"

namespace kiln::dist {

// The groups of one local world, rank r at [r], sharing a HashStore. Each is driven by one thread;
// a group destroyed (its thread done) fails collectives the others wait on in it, naming its rank.
std::vector<std::shared_ptr<ProcessGroup>> make_local_groups(int world_size,
                                                             std::chrono::milliseconds timeout = kDefaultTimeout);

// Runs fn(group) on `world_size` threads, one rank each. When a rank throws, the world is aborted
// (the others' collectives fail at once) and, after every thread ended, run_local throws
// "[run_local] rank R failed: <its error>" for the first rank that failed.
void run_local(int world_size, const std::function<void(ProcessGroup&)>& fn,
               std::chrono::milliseconds timeout = kDefaultTimeout);

}  // namespace kiln::dist

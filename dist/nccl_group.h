// The NCCL backend: one communicator per group on this rank's GPU, its unique id exchanged through
// the TcpStore. Collectives run on the group's own high-priority stream, ordered after the caller's
// current stream by an event; Work::wait orders the caller's stream after them. A watchdog thread
// aborts the communicator when a collective runs past the timeout, a peer vanishes, or ranks called
// different collectives, so every rank errors instead of hanging.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "dist/process_group.h"
#include "dist/tcp_store.h"

namespace kiln::dist {

// device: this rank's CUDA device index. check_calls: exchange a record of each call first (one
// 24-byte all_gather) so mismatched calls fail with a clear error. Throws kiln::Error in a build
// without NCCL.
std::shared_ptr<ProcessGroup> make_nccl_group(std::shared_ptr<TcpStore> store, int device,
                                              std::chrono::milliseconds timeout, const std::string& name = "default",
                                              bool check_calls = true);

}  // namespace kiln::dist

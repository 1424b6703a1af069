// The Gloo backend: CPU processes connected by Gloo's TCP transport after a rendezvous through the
// TcpStore. Collectives run in order on a worker thread (Work::wait blocks until theirs is done);
// ranks exchange a record of each call first, so a mismatch is an error on every rank.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "dist/process_group.h"
#include "dist/tcp_store.h"

namespace kiln::dist {

// Throws kiln::Error in a build without Gloo (-Dgloo=disabled or libgloo-dev missing).
std::shared_ptr<ProcessGroup> make_gloo_group(std::shared_ptr<TcpStore> store, std::chrono::milliseconds timeout,
                                              const std::string& name = "default");

}  // namespace kiln::dist

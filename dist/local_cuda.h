// The GPU half of the local backend (internal): queues one collective for every rank's tensors on
// the device's collective stream, after each rank's ready event, and records `done` after it.
#pragma once
#include <memory>
#include <vector>

#include "core/cuda/runtime.h"
#include "dist/process_group.h"

namespace kiln::dist {

// calls[r] is rank r's call; every tensor is on one CUDA device. Fences the tensors' memory with
// record_stream so none is reused before the collective finished.
void local_cuda_enqueue(const std::vector<Call>& calls, const std::vector<std::unique_ptr<cuda::Event>>& ready,
                        cuda::Event& done);

}  // namespace kiln::dist

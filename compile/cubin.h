// Cubins: generated source -> NVRTC -> cubin (SASS) for one GPU architecture ("sm_90"), through the disk
// cache (compile/disk_cache.h). Needs no GPU, only libnvrtc; CUDA builds only.
#pragma once
#include <string>

namespace kiln::compile {

// "13.0": the NVRTC version, part of every disk cache key.
std::string nvrtc_version();
// The cubin of `source` for `arch`, from the disk cache or compiled (counted in compile::stats()).
// A source NVRTC rejects is an error quoting NVRTC's log and the source.
std::string compile_cubin(const std::string& source, const std::string& arch);

}  // namespace kiln::compile

// NVRTC compilation of generated kernels against the embedded kiln headers, cached on disk by
// source, NVRTC version, architecture and options.
#include "compile/cubin.h"

#include <fmt/format.h>
#include <nvrtc.h>

#include <chrono>
#include <memory>
#include <vector>

#include "compile/codegen.h"
#include "compile/disk_cache.h"
#include "compile/embedded_headers.h"
#include "compile/log.h"
#include "core/error.h"

namespace kiln::compile {
namespace {

// philox.h includes <cstdint>; NVRTC compiles without the host's standard headers.
constexpr const char* kCstdint = R"(#pragma once
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
)";

std::vector<std::string> options_for(const std::string& arch) {
  return {"--gpu-architecture=" + arch, "-std=c++17", "--fmad=true"};
}

void check(nvrtcResult r, const char* what) {
  KILN_CHECK(r == NVRTC_SUCCESS, "compile", "{} failed: {}", what, nvrtcGetErrorString(r));
}

}  // namespace

std::string nvrtc_version() {
  int major = 0, minor = 0;
  check(nvrtcVersion(&major, &minor), "nvrtcVersion");
  return fmt::format("{}.{}", major, minor);
}

std::string compile_cubin(const std::string& source, const std::string& arch) {
  const std::vector<std::string> opts = options_for(arch);
  std::string key = fmt::format("nvrtc {} {}", nvrtc_version(), fmt::join(opts, " "));
  for (const auto& h : embedded::kHeaders) key += fmt::format("\n{:016x}", fnv1a(h.text));
  key += "\n" + source;
  const DiskCache disk = DiskCache::from_environment();
  if (std::optional<std::string> hit = disk.get(key)) {
    ++counters().kernel_disk_hits;
    return *hit;
  }
  const auto started = std::chrono::steady_clock::now();
  std::vector<const char*> texts, names;
  for (const auto& h : embedded::kHeaders) {
    texts.push_back(h.text);
    names.push_back(h.name);
  }
  texts.push_back(kCstdint);
  names.push_back("cstdint");
  nvrtcProgram prog;
  check(nvrtcCreateProgram(&prog, source.c_str(), "kiln_fused.cu", static_cast<int>(texts.size()), texts.data(), names.data()),
        "nvrtcCreateProgram");
  std::unique_ptr<nvrtcProgram, void (*)(nvrtcProgram*)> guard(&prog, [](nvrtcProgram* p) { nvrtcDestroyProgram(p); });
  std::vector<const char*> copts;
  for (const std::string& o : opts) copts.push_back(o.c_str());
  const nvrtcResult r = nvrtcCompileProgram(prog, static_cast<int>(copts.size()), copts.data());
  if (r != NVRTC_SUCCESS) {
    size_t n = 0;
    nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    nvrtcGetProgramLog(prog, log.data());
    KILN_FAIL("compile", "NVRTC rejected a generated kernel ({}):\n{}\n--- source ---\n{}", nvrtcGetErrorString(r), log,
              source);
  }
  size_t n = 0;
  check(nvrtcGetCUBINSize(prog, &n), "nvrtcGetCUBINSize");
  std::string cubin(n, '\0');
  check(nvrtcGetCUBIN(prog, cubin.data()), "nvrtcGetCUBIN");
  ++counters().kernel_compiles;
  counters().kernel_compile_us +=
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
  disk.put(key, cubin);
  return cubin;
}

}  // namespace kiln::compile

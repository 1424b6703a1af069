// The benchmarks' check of a bare cuBLASLt call: prints what failed and exits (a benchmark has no one to
// hand the error to).
#pragma once
#include <cublasLt.h>

#include <cstdio>
#include <cstdlib>

namespace kiln::bench {

inline void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s failed: %s\n", what, cublasLtGetStatusString(s));
    std::exit(1);
  }
}

}  // namespace kiln::bench

#!/usr/bin/env bash
# The CUDA suite in two steps, so the binaries can be built on a machine without a GPU:
#   tools/cuda_suite.sh build        # here: build with CUDA (sm_90a), fmt header-only, Catch2 static,
#                                    # and copy the test and bench binaries into .device-bin/
#   tools/cuda_suite.sh run [args]   # on the GPU machine (carry .device-bin): the [cuda] tests, then
#                                    # compute-sanitizer memcheck and racecheck over them; args go to kiln_tests
#   tools/cuda_suite.sh bench        # on the GPU machine: every bench/cuda_* program, tables to stdout
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device-bin
case "${1:-}" in
  build)
    [ "${KILN_SKIP_BOOTSTRAP:-0}" = 1 ] || tools/bootstrap.sh
    if [ -f build-cuda/build.ninja ]; then meson setup --reconfigure build-cuda -Dcuda=enabled -Dfmt_header_only=true -Dwerror=true
    else meson setup build-cuda -Dcuda=enabled -Dfmt_header_only=true -Dwerror=true; fi
    ninja -C build-cuda
    rm -rf "$out" && mkdir -p "$out"
    cp build-cuda/tests/kiln_tests "$out/"
    find build-cuda/bench -maxdepth 1 -type f -executable -name 'cuda_*' -exec cp {} "$out/" \;
    cp tools/cuda_suite.sh "$out/"
    ls -la "$out"
    ;;
  run|bench)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export NCCL_NVLS_ENABLE=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    if [ "$1" = bench ]; then
      for b in "$out"/cuda_*; do echo "== $b"; "$b"; done
      exit 0
    fi
    shift
    ldd "$out/kiln_tests" | grep -E "not found" && { echo "cuda_suite: missing shared libraries"; exit 1; }
    "$out/kiln_tests" "[cuda]" "$@"
    if [ "${KILN_SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 99 "$out/kiln_tests" "[cuda]" "$@" >"/tmp/sanitizer-$tool.log" 2>&1 &&
          echo "$tool: clean" || { tail -40 "/tmp/sanitizer-$tool.log"; echo "$tool: FAILED"; exit 1; }
      done
    fi
    ;;
  *)
    sed -n 2,8p "$0"
    exit 2
    ;;
esac

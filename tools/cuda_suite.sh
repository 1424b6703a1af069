#!/usr/bin/env bash
# The CUDA suite in two steps, so the binaries can be built on a machine without a GPU:
#   tools/cuda_suite.sh build        # here: build with CUDA (sm_90a), fmt header-only, Catch2 static, and
#                                    # pack the stripped test and bench binaries into .device-bin/kiln-cuda.tar.xz
#   tools/cuda_suite.sh run [args]   # on the GPU machine (carry .device-bin): the [cuda] tests, then
#                                    # compute-sanitizer memcheck and racecheck over them (KILN_SANITIZE=0 skips,
#                                    # KILN_SANITIZE_FILTER narrows, KILN_SANITIZE_TIMEOUT bounds each); args go to kiln_tests
#   tools/cuda_suite.sh bench        # on the GPU machine: every CUDA bench program, tables to stdout
#   tools/cuda_suite.sh unpack       # on the GPU machine: only unpack (into /tmp/kiln-cuda-bin) and print the
#                                    # environment to source, to run `kiln` or one bench by hand
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device-bin
bin=/tmp/kiln-cuda-bin  # where the GPU machine unpacks them
case "${1:-}" in
  build)
    [ "${KILN_SKIP_BOOTSTRAP:-0}" = 1 ] || tools/bootstrap.sh
    if [ -f build-cuda/build.ninja ]; then meson setup --reconfigure build-cuda -Dcuda=enabled -Dfmt_header_only=true -Dwerror=true
    else meson setup build-cuda -Dcuda=enabled -Dfmt_header_only=true -Dwerror=true; fi
    ninja -C build-cuda
    stage=build-cuda/device-bin
    rm -rf "$stage" "$out" && mkdir -p "$stage" "$out"
    cp build-cuda/tests/kiln_tests build-cuda/examples/kiln/kiln "$stage/"
    for extra in build-cuda/tests/test_dist_worker; do [ -x "$extra" ] && cp "$extra" "$stage/"; done
    find build-cuda/bench -maxdepth 1 -type f -executable -exec cp {} "$stage/" \;
    strip "$stage"/*
    tar -cJf "$out/kiln-cuda.tar.xz" -C "$stage" .  # the device machine takes at most 64 MiB per call
    ls -la "$out"
    ;;
  run|bench|unpack)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export NCCL_NVLS_ENABLE=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    rm -rf "$bin" && mkdir -p "$bin" && tar -xJf "$out/kiln-cuda.tar.xz" -C "$bin"
    if [ "$1" = unpack ]; then
      echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0"
      exit 0
    fi
    if [ "$1" = bench ]; then
      for b in "$bin"/cuda_* "$bin"/compile_* "$bin"/dist_* "$bin"/fsdp_*; do [ -x "$b" ] && { echo "== $b"; "$b"; }; done
      exit 0
    fi
    shift
    ldd "$bin/kiln_tests" | grep -E "not found" && { echo "cuda_suite: missing shared libraries"; exit 1; }
    "$bin/kiln_tests" "[cuda]" "$@"
    if [ "${KILN_SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        # API calls that fail on purpose (the out-of-memory test) are not memory errors: --report-api-errors no.
        # racecheck: NVIDIA's own generated kernels (cuDNN SDPA "cudnn_generated", cuBLASLt "nvjet_") report
        # hazards on their wgmma/TMA shared-memory traffic that kiln cannot act on (bench/RESULTS.md): cuDNN's
        # are not instrumented, and only hazards in other kernels fail the run.
        exclude=()
        [ "$tool" = racecheck ] && exclude=(--kernel-name-exclude kns=cudnn_generated)
        rc=0
        timeout "${KILN_SANITIZE_TIMEOUT:-900}" compute-sanitizer --tool "$tool" --error-exitcode 99 --report-api-errors no \
          "${exclude[@]}" "$bin/kiln_tests" "${KILN_SANITIZE_FILTER:-[cuda]}" >"/tmp/sanitizer-$tool.log" 2>&1 || rc=$?
        if [ "$tool" = racecheck ] && [ $rc = 99 ] && ! grep "Race reported" "/tmp/sanitizer-$tool.log" | grep -qv "nvjet_"; then
          echo "racecheck: hazards reported only inside cuBLASLt's nvjet kernels"
          rc=0
        fi
        grep -v '^\[' "/tmp/sanitizer-$tool.log" | grep -E "SUMMARY|passed|failed" | tail -3
        case $rc in
          0) echo "$tool: clean" ;;
          124) echo "$tool: stopped at the time limit (KILN_SANITIZE_TIMEOUT) with no error reported so far" ;;
          *) grep -v '^\[' "/tmp/sanitizer-$tool.log" | grep -m 80 -A 14 '^========= [A-Z]'; echo "$tool: FAILED (exit $rc)"; exit 1 ;;
        esac
      done
    fi
    ;;
  *)
    sed -n 2,8p "$0"
    exit 2
    ;;
esac

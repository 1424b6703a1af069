#!/usr/bin/env bash
# Configures one build folder (build/ unless given) the way tools/run_example.sh and tools/test.sh both use it, so
# that the first run's build is the test build too: warnings as errors (-Dwerror=true), the CUDA backend only where a
# GPU is present (`nvidia-smi -L` lists one; without one its [cuda] tests would only skip, and nvcc doubles the build
# time; KILN_MESON_ARGS="-Dcuda=enabled" builds it regardless), then KILN_MESON_ARGS (e.g. "-Dcpu_arch=native").
# Idempotent: an existing folder is reconfigured with these options (under a second; nothing rebuilds when they are
# the ones it had; wiped when meson cannot reconfigure it), a missing one is set up.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
read -r -a extra <<<"${KILN_MESON_ARGS:-}"
if [[ " ${KILN_MESON_ARGS:-} " != *" -Dcuda="* ]]; then
  if nvidia-smi -L 2>/dev/null | grep -q GPU; then extra=(-Dcuda=auto "${extra[@]}"); else extra=(-Dcuda=disabled "${extra[@]}"); fi
fi
opts=(-Dwerror=true "${extra[@]}")
if [ -f "$build/meson-private/coredata.dat" ]; then
  meson setup --reconfigure "$build" "${opts[@]}" >/dev/null || meson setup --wipe "$build" "${opts[@]}"
else
  rm -rf "$build"
  meson setup "$build" "${opts[@]}"
fi

#!/usr/bin/env bash
# The run command: installs dependencies (tools/bootstrap.sh; skip with KILN_SKIP_BOOTSTRAP=1), configures
# build/ once, builds the character-model example and runs it; arguments go to the example (--steps, --lr,
# --seed, --text FILE, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KILN_SKIP_BOOTSTRAP:-0}" = 1 ] || tools/bootstrap.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build examples/train_char_model
exec build/examples/train_char_model "$@"

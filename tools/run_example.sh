#!/usr/bin/env bash
# The run command: installs dependencies (tools/bootstrap.sh; skip with KILN_SKIP_BOOTSTRAP=1), configures
# build/ once, builds the `kiln` command line and runs `kiln finetune` with the given arguments. With none,
# that is the default job: QLoRA on a small Llama-architecture model over the embedded KJV corpus (on the
# GPU when there is one). Everything it writes goes to runs/default (--output DIR to change).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KILN_SKIP_BOOTSTRAP:-0}" = 1 ] || tools/bootstrap.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build examples/kiln/kiln
exec build/examples/kiln/kiln finetune "$@"

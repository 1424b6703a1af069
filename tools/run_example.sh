#!/usr/bin/env bash
# The run command: installs dependencies (tools/bootstrap.sh; skip with KILN_SKIP_BOOTSTRAP=1), configures build/
# (tools/configure.sh: the same folder and options as tools/test.sh, so a later test run reuses this build; CUDA only
# where a GPU is present), builds only the `kiln` command line and runs `kiln finetune` with the given arguments.
# With none, that is the default job: QLoRA of kiln's default base (a tiny Llama pretrained by kiln on the King
# James Bible, data/default/base) on The Devil's Dictionary (on the GPU when there is one). Everything it writes
# goes to runs/default (--output DIR to change).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KILN_SKIP_BOOTSTRAP:-0}" = 1 ] || tools/bootstrap.sh
tools/configure.sh build
ninja -C build examples/kiln/kiln
exec build/examples/kiln/kiln finetune "$@"

#!/usr/bin/env bash
# Makes data/default/base, the base model of kiln's default job: the "tiny" Llama (nn/llama_config.cpp: 4 layers,
# 256 wide, grouped-query attention, the default tokenizer's 4,096 ids; 3.9M parameters) pretrained by kiln itself
# on the King James Bible (third_party/corpus/kjv.txt, written by tools/bootstrap.sh): every weight trained
# (--full) in f32 on the CPU from random weights, then written in bf16 (7.7 MB) by kiln export. This is the command
# that made the committed copy: 1,200 steps of 8 x 256 tokens (2.5 epochs of the KJV's 1.0M tokens) in 24 minutes
# on 2 CPU cores shared with other work; held-out loss 8.6 (random weights) -> 4.77 at step 200 -> 3.78 at the end
# (runs/default-base/metrics.jsonl). tests/test_defaults.cpp checks the result against held-out KJV chapters.
# KILN_BUILD names the build folder (default build/, configured as tools/run_example.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${KILN_BUILD:-build}
run=runs/default-base
[ -s third_party/corpus/kjv.txt ] || { echo "make_default_base: third_party/corpus/kjv.txt is missing: run tools/bootstrap.sh" >&2; exit 1; }
tools/configure.sh "$build"
ninja -C "$build" examples/kiln/kiln
kiln=$build/examples/kiln/kiln

nice "$kiln" finetune --full --base bf16 --dtype f32 --device cpu --config tiny --random-init --seed 0 \
  --data third_party/corpus/kjv.txt --text-split blank_lines --eval-fraction 0.02 \
  --seq-len 256 --batch-size 8 --steps 1200 --lr 3e-3 --schedule cosine --warmup 50 \
  --eval-every 200 --eval-batches 8 --save-every 400 --log-every 50 --sample-prompt "And God said" \
  --output "$run"
rm -rf data/default/base
"$kiln" export --model "$run/model" --dtype bf16 --output data/default/base
ls -l data/default/base

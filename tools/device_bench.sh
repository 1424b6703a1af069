#!/usr/bin/env bash
# The measurements behind bench/RESULTS.md, as stages of one device call (run from the repository root on the GPU
# machine, carrying .device-bin, third_party/corpus and, for `unsloth`, .anchors):
#   tools/device_bench.sh STAGE...
# Binaries: .device-bin/kiln-cuda.tar.xz (tools/cuda_suite.sh build); `ab` also runs .device-bin/base.tar.xz (an
# older pack, renamed) on the same machine. Stages (each prints its command lines):
#   suite    the [cuda] tests (SUITE_FILTER, default "[cuda]"), no sanitizers
#   ab       8B QLoRA B1 T4096 steps, base and new alternating (AB_ROUNDS, default 2; AB_BUDGETS, default "7.04,0")
#   plan8b   8B QLoRA B1 T4096 at PLAN_BUDGETS (default "least,8,0")
#   b4       8B QLoRA B4 T2048 at B4_BUDGETS (default "least,0")
#   long     8B QLoRA at LONG_SEQ (default 131072) and LONG_BUDGETS (default least), with --mlp-chunk 16384, one timed
#            step after LONG_WARMUP untimed ones (default 1; 0 where one step is all the run can afford)
#   longest  the planner's least plan at LONGEST_SEQ (default 131072), twice that, ... tokens up to LONGEST_MAX, bisected
#            down to LONGEST_STEP tokens: the longest sequence that fits this GPU and HOST_BUDGET GiB of pinned host
#            memory (default: half the free host memory); no step runs (LONGEST_TIMEOUT, default 300 s)
#   compile  one decoder layer at T4096, eager against compiled, bf16 and QLoRA
#   compileab  `kiln finetune` 8B QLoRA B1 T4096, 20 steps, eager and --compile alternating (COMPILE_ROUNDS, default
#            2), every layer checkpointed (COMPILE_MODE=checkpointing) or at a memory budget (COMPILE_MODE=7.04)
#   nf4      NF4 dequantisation against copy bandwidth (nf4ab: the base pack's and the new one's, alternating)
#   head     the chunked linear+loss head (cuda_chunked_loss 5 16384)
#   unsloth  the Unsloth anchor (UNSLOTH_PARTS, default train; ANCHOR_BUDGET, default 300 s)
#   pcie     pinned host <-> device copy bandwidth (PyTorch), 256 MiB each way, alone and both at once
#   multigpu on a machine of several GPUs: the NCCL tests; the default model on one rank and on every GPU (sharded
#            and plain: the same losses), a sharded resume on every rank and on one; then `kiln finetune` 8B QLoRA
#            B1 T4096 (10 steps) on one rank (the ranks' global batch) and on every GPU, sharded and plain: losses,
#            tokens/s and which processes hold memory on which GPU. KILN_DIST_TIMEOUT (default 60 s here) bounds a hang;
#            MULTIGPU_PARTS (default "tests tiny 8b") picks parts.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0
root=$PWD
unpack() {  # unpack TAR DIR
  [ -d "$2" ] || { mkdir -p "$2" && tar -xJf "$1" -C "$2"; }
}
new=/tmp/kiln-new base=/tmp/kiln-base
unpack .device-bin/kiln-cuda.tar.xz $new
step() { echo "+ $*"; "$@" 2>&1; echo "  (exit $?)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git -C "$root" log --oneline -1 2>/dev/null || true
for stage in "$@"; do
  echo "== $stage [$(date +%T)]"
  case $stage in
    suite) step $new/kiln_tests "${SUITE_FILTER:-[cuda]}" ;;
    ab)
      unpack .device-bin/base.tar.xz $base
      for round in $(seq "${AB_ROUNDS:-2}"); do
        for v in base new; do
          d=$base; [ $v = new ] && d=$new
          echo "-- $v round $round"
          step $d/cuda_memory_plan --iters 3 --budgets "${AB_BUDGETS:-7.04,0}"
        done
      done ;;
    plan8b) step $new/cuda_memory_plan --iters 3 --budgets "${PLAN_BUDGETS:-least,8,0}" ;;
    b4) step $new/cuda_memory_plan --iters 3 --batch 4 --seq 2048 --budgets "${B4_BUDGETS:-least,0}" ;;
    long) step timeout "${LONG_TIMEOUT:-400}" $new/cuda_memory_plan --iters 1 --warmup "${LONG_WARMUP:-1}" --seq "${LONG_SEQ:-131072}" \
            --mlp-chunk 16384 --budgets "${LONG_BUDGETS:-least}" ;;
    longest) step timeout "${LONGEST_TIMEOUT:-300}" $new/cuda_memory_plan --longest --seq "${LONGEST_SEQ:-131072}" \
               --mlp-chunk 16384 ${LONGEST_MAX:+--longest-max "$LONGEST_MAX"} ${LONGEST_STEP:+--longest-step "$LONGEST_STEP"} \
               ${HOST_BUDGET:+--host-budget "$HOST_BUDGET"} ;;
    compile)
      step $new/compile_block 4096 5
      step $new/compile_block 4096 5 --qlora ;;
    compileab)
      mode=${COMPILE_MODE:-checkpointing}
      if [ "$mode" = checkpointing ]; then plan=(--checkpointing); else plan=(--memory-budget "$mode"); fi
      for round in $(seq "${COMPILE_ROUNDS:-2}"); do
        for c in "" --compile; do
          echo "-- ${c:-eager} round $round"
          rm -rf /tmp/kiln-ft
          step $new/kiln finetune --config llama3.1-8b --random-init --seq-len 4096 --batch-size 1 "${plan[@]}" $c \
            --steps 20 --log-every 10 --eval-every 0 --save-every 0 --sample-tokens 0 --output /tmp/kiln-ft
        done
      done ;;
    multigpu)
      gpus=$(nvidia-smi -L | grep -c GPU)
      [ "$gpus" -ge 2 ] || { echo "multigpu: $gpus GPU on this machine (ask for a kind of several)"; continue; }
      # A hang ends within KILN_DIST_TIMEOUT (naming the missing rank) and every step within its own limit, so
      # one stuck stage does not take the whole call; NCCL says why it failed.
      export KILN_DIST_TIMEOUT=${KILN_DIST_TIMEOUT:-60} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
      export KILN_DEFAULT_CORPUS=$root/third_party/corpus/devil.txt KILN_DEFAULT_BASE=$root/data/default/base
      parts=" ${MULTIGPU_PARTS:-tests tiny 8b} "  # a part per device call where the limits add up past one
      [[ $parts == *" tests "* ]] && step timeout 150 $new/kiln_tests "[nccl]"
      # The default model over NCCL, seconds a run: one rank with the same global batch, sharded, plain; the
      # losses must agree (metrics.jsonl); then a sharded resume on every rank and on one.
      if [[ $parts == *" tiny "* ]]; then
        tiny=(finetune --device cuda --steps 4 --seq-len 16 --eval-every 0 --sample-tokens 0 --save-every 0 --log-every 1
              --warmup 0 --lr 0.01 --batch-size 1)
        rm -rf /tmp/mg-1 /tmp/mg-s /tmp/mg-p
        step timeout 60 $new/kiln "${tiny[@]}" --grad-accum "$gpus" --output /tmp/mg-1
        step timeout 90 $new/kiln "${tiny[@]}" --nproc "$gpus" --shard --output /tmp/mg-s
        step timeout 90 $new/kiln "${tiny[@]}" --nproc "$gpus" --output /tmp/mg-p
        for d in /tmp/mg-1 /tmp/mg-s /tmp/mg-p; do echo "$d: $(grep -o '"loss": *[^,]*' $d/metrics.jsonl | tr '\n' ' ')"; done
        ls /tmp/mg-s/checkpoint-4/shards 2>&1
        step timeout 90 $new/kiln "${tiny[@]}" --nproc "$gpus" --shard --resume --steps 6 --output /tmp/mg-s
        step timeout 60 $new/kiln "${tiny[@]}" --shard --resume --steps 8 --output /tmp/mg-s
      fi
      [[ $parts == *" 8b "* ]] || continue
      # 8B QLoRA, checkpointing: one rank (global batch as the ranks'), every GPU sharded and plain; which
      # processes hold memory on which GPU (a rank on another rank's GPU is a stray CUDA context).
      ft=(finetune --config llama3.1-8b --random-init --seq-len 4096 --batch-size 1 --checkpointing --steps 10
          --log-every 5 --eval-every 0 --save-every 0 --sample-tokens 0)
      for run in "1 --grad-accum $gpus" "$gpus --shard" "$gpus"; do
        set -- $run
        n=$1
        shift
        echo "-- $n rank(s) $*"
        rm -rf /tmp/kiln-mg /tmp/apps
        (for i in $(seq 40); do nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv,noheader; sleep 5; done) >/tmp/apps 2>&1 &
        apps=$!
        step timeout 180 $new/kiln "${ft[@]}" --nproc "$n" "$@" --output /tmp/kiln-mg
        kill $apps 2>/dev/null
        sort -u /tmp/apps | awk -F, '{print "  app", $1, $2}' | sort -u
      done ;;
    nf4) step $new/cuda_nf4 ;;
    nf4ab)  # the NF4 bench of the base pack and of the new one, alternating
      unpack .device-bin/base.tar.xz $base
      for round in 1 2; do step $base/cuda_nf4; step $new/cuda_nf4; done ;;
    head) step $new/cuda_chunked_loss 5 16384 ;;
    unsloth)
      [ -d .anchors ] || { echo "unsloth: carry .anchors (../shared/anchors/README.md)"; continue; }
      (cd .anchors && ANCHOR_BUDGET=${ANCHOR_BUDGET:-300} UNSLOTH_PARTS=${UNSLOTH_PARTS:-train} \
         bash anchors/run_anchors.sh make unsloth) ;;
    pcie) python3 - <<'PY'
import torch
n = 256 << 20
d = torch.empty(n, dtype=torch.uint8, device="cuda")
h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
h2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def timed(fn, reps=10):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3
def both():
    with torch.cuda.stream(s1): h.copy_(d, non_blocking=True)
    with torch.cuda.stream(s2): d.copy_(h2, non_blocking=True)
    torch.cuda.current_stream().wait_stream(s1); torch.cuda.current_stream().wait_stream(s2)
for name, fn, nbytes in [("device->host", lambda: h.copy_(d, non_blocking=True), n),
                         ("host->device", lambda: d.copy_(h, non_blocking=True), n),
                         ("both at once (each way)", both, n)]:
    print(f"{name}: {nbytes / timed(fn) / 1e9:.1f} GB/s")
PY
      ;;
    *) echo "unknown stage $stage"; sed -n 2,17p "$0"; exit 2 ;;
  esac
done
echo "== done [$(date +%T)]"

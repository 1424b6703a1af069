#!/usr/bin/env bash
# libFuzzer smoke runs of the fuzz targets in tests/fuzz (one per parser of outside input).
#   tools/fuzz.sh [SECONDS] [TARGET...]     each target SECONDS (default 60) on its corpus; all targets by default
# Configures build-fuzz/ with clang (-Dfuzz=true: ASan + UBSan + fuzzer coverage everywhere) when it has no
# build.ninja yet, builds only the fuzz_<target> programs, then runs each on a working copy of
# tests/fuzz/corpus/<target> and tests/fuzz/regressions/<target> (build-fuzz/fuzz/corpus/<target>: inputs
# libFuzzer finds stay there, the committed seeds are left alone). A crash, sanitizer report, uncaught
# exception other than kiln::Error, timeout or out-of-memory saves the input to build-fuzz/fuzz/crashes/<target>/
# and the log to build-fuzz/fuzz/<target>.log. Prints one table row per target (runs, seconds, crashes) and
# exits non-zero when any target crashed. After fixing a crash, keep its input in
# tests/fuzz/regressions/<target>/ (kiln_tests' [fuzz] case replays it on every test run).
# Env: KILN_FUZZ_JOBS=N runs N targets at once (default 1); KILN_FUZZ_ARGS adds libFuzzer flags;
# KILN_FUZZ_SMOKE=1 (tools/test.sh's smoke run) starts each target from the committed seeds alone in a fresh
# folder with libFuzzer's -seed=1, so the same inputs are tried on every machine (a prefix of them where a
# slow machine reaches the time limit first), and keeps nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=60
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then seconds=$1; shift; fi
build=build-fuzz
all_targets=(adapter_config bnb_quant_state dataset eval_ids finetune_config llama_config safetensors safetensors_index
  tokenizer trainer_state)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target '$t' (${all_targets[*]})" >&2; exit 2; }
done
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (tools/bootstrap.sh installs clang and libFuzzer)" >&2; exit 2; }

if [ ! -f "$build/build.ninja" ]; then
  CC=clang CXX=clang++ meson setup "$build" -Dcuda=disabled -Dfuzz=true -Dbuildtype=release -Doptimization=1 \
    -Db_ndebug=false || exit 2
fi
build_start=$(date +%s)
ninja -C "$build" $(printf 'tests/fuzz/fuzz_%s ' "${targets[@]}") || { echo "fuzz.sh: build failed" >&2; exit 2; }
echo "fuzz.sh: built ${#targets[@]} targets in $(( $(date +%s) - build_start )) s"

out="$build/fuzz"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
read -r -a user_args <<<"${KILN_FUZZ_ARGS:-}"

smoke_dir=""
if [ "${KILN_FUZZ_SMOKE:-0}" = 1 ]; then
  smoke_dir=$(mktemp -d)
  trap 'rm -rf "$smoke_dir"' EXIT
  user_args+=(-seed=1)
fi

run_target() {  # target -> writes $out/<target>.log and .row
  local t=$1 work="$out/corpus/$1" crashes="$out/crashes/$1"
  [ -n "$smoke_dir" ] && work="$smoke_dir/$1"
  mkdir -p "$work" "$crashes"
  rm -f "$crashes"/*
  local seeds=("tests/fuzz/corpus/$t")
  [ -d "tests/fuzz/regressions/$t" ] && seeds+=("tests/fuzz/regressions/$t")
  local start rc
  start=$(date +%s)
  "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2560 -print_final_stats=1 \
    -artifact_prefix="$crashes/" "${user_args[@]}" "$work" "${seeds[@]}" >"$out/$t.log" 2>&1
  rc=$?
  local runs elapsed found
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' | tail -n 1)
  elapsed=$(( $(date +%s) - start ))
  found=$(find "$crashes" -type f | wc -l)
  [ "$rc" -ne 0 ] && [ "$found" -eq 0 ] && found=1  # died without an artifact (e.g. a crash at start-up)
  echo "$t ${runs:-?} $elapsed $found $rc" >"$out/$t.row"
}

mkdir -p "$out"
jobs_max=${KILN_FUZZ_JOBS:-1}
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  echo "fuzz.sh: $t for ${seconds} s"
  run_target "$t" &
done
wait

status=0
printf '\n%-18s %12s %8s %8s\n' target runs seconds crashes
for t in "${targets[@]}"; do
  read -r name runs elapsed found rc <"$out/$t.row"
  printf '%-18s %12s %8s %8s\n' "$name" "$runs" "$elapsed" "$found"
  if [ "$found" -ne 0 ]; then
    status=1
    for f in "$out/crashes/$t"/*; do
      [ -f "$f" ] && echo "  $t: $f (reproduce: $build/tests/fuzz/fuzz_$t $f; log $out/$t.log)"
    done
    [ -n "$(find "$out/crashes/$t" -type f)" ] || echo "  $t: exit $rc without an input saved; see $out/$t.log"
  fi
done
[ $status -eq 0 ] || echo "fuzz.sh: crashes found: fix them, then keep each input in tests/fuzz/regressions/<target>/"
exit $status

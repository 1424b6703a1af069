#!/usr/bin/env bash
# The test command: installs dependencies (tools/bootstrap.sh --test-tools, which adds llama-cpp-python for the
# [export] check in llama.cpp; skip with KILN_SKIP_BOOTSTRAP=1), configures
# build/ with tools/configure.sh (-Dwerror=true; the folder and options tools/run_example.sh uses too, so one
# build serves both), builds, runs the Catch2 suite with a console and a JUnit reporter, and ends
# with one line "N passed, N failed, N skipped" counting test cases. Arguments go to kiln_tests ("[autograd]").
# KILN_MESON_ARGS adds meson options (e.g. "-Dcpu_arch=native"). Where no GPU is present (no nvidia-smi
# that lists one) the CUDA backend is left out (-Dcuda=disabled): its [cuda] tests would skip anyway and
# nvcc doubles the build time. KILN_MESON_ARGS="-Dcuda=enabled" builds it regardless (a compile check).
# Three checks outside Catch2 count as one case each in that line (passed, failed, or skipped):
#   layers   before the build: tools/check_layers.py --self-test (it must catch planted wrong-way
#            includes), then tools/check_layers.py (every #include points down the layer order);
#   install  after the build: meson install into a temporary DESTDIR; every installed header must
#            compile with only `pkg-config --cflags kiln` of that install; tests/install/consumer.cpp,
#            copied out of the tree, is built with `c++ -std=c++20 consumer.cpp $(pkg-config --cflags
#            --libs kiln)` and run; the installed `kiln` runs two steps of the default job and must have
#            found its base model and corpus beside itself (<prefix>/share/kiln), not in the source tree.
#            KILN_SKIP_INSTALL_CHECK=1 skips it (counted as skipped).
#   sanitizers  after the suite (one case, though it reruns the suite): build-asan/ (CPU only,
#            debugoptimized, -Db_sanitize=address,undefined,
#            UBSan made fatal with -fno-sanitize-recover=undefined) builds only what the suite needs
#            (tests/kiln_tests, its tests/test_dist_worker and examples/kiln/kiln, which test_fsdp_cli runs),
#            then runs the whole suite (the arguments, when given, pick the same cases as above) under
#            AddressSanitizer with leak detection and UBSan; passed when it exits 0 with no report. [cuda]
#            cases are left out (no CUDA in that build; they would only skip). No suppressions. The
#            build-asan/ build does not pass -Werror: GCC 12's instrumentation gives false
#            -Wmaybe-uninitialized in libstdc++'s <regex>; warnings are the plain -Werror build's job.
#            Cost on 2 cores: about 40 CPU-minutes to build from scratch (20 min wall), 2.5 min to run.
#            KILN_SKIP_SANITIZERS=1 skips it (counted as skipped), e.g. for quick local runs.
#   fuzz     after that (one case): tools/fuzz.sh builds the libFuzzer targets with clang in build-fuzz/ and runs
#            each for KILN_FUZZ_SMOKE_SECONDS (10) from its committed seeds with a fixed libFuzzer seed; passed when
#            none crashes. About 10 minutes of build from scratch on 2 cores. KILN_SKIP_FUZZ=1 skips it.
# A failing check makes the script exit non-zero; the build and the suite still run.
set -uo pipefail
cd "$(dirname "$0")/.."
build=build
bin="$build/tests/kiln_tests"
junit="$build/junit.xml"

if [ "${KILN_SKIP_BOOTSTRAP:-0}" != 1 ]; then
  tools/bootstrap.sh --test-tools || { echo "test.sh: tools/bootstrap.sh failed"; exit 1; }
fi

extra_passed=0 extra_failed=0 extra_skipped=0
count() { case $1 in 0) extra_passed=$((extra_passed + 1)) ;; skip) extra_skipped=$((extra_skipped + 1)) ;;
  *) extra_failed=$((extra_failed + 1)) ;; esac; }
# check NAME SKIP_VAR WHAT COMMAND...: one counted case outside Catch2 (passed when COMMAND succeeds);
# skipped, and counted so, when $SKIP_VAR is 1.
check() {
  local name=$1 skip_var=$2 what=$3 t0
  shift 3
  if [ "${!skip_var:-0}" = 1 ]; then
    echo "test.sh: $name skipped ($skip_var=1)"
    count skip
    return
  fi
  echo "test.sh: $name ($what)"
  t0=$(date +%s)
  if "$@"; then count 0; else echo "test.sh: FAILED $name (the report is above)"; count 1; fi
  echo "test.sh: $name took $(($(date +%s) - t0)) s"
}

# Layer check: the checker proves it catches a wrong-way include, then checks the tree.
echo "test.sh: layer check (tools/check_layers.py)"
if python3 tools/check_layers.py --self-test && python3 tools/check_layers.py; then count 0; else
  echo "test.sh: FAILED layer check: an #include points up or sideways (allowed: LAYERS in tools/check_layers.py)"
  count 1
fi

# Idempotent configure (tools/configure.sh): an existing build/ with the same options is reused as it is.
tools/configure.sh "$build" || { echo "test.sh: meson setup failed"; exit 1; }
ninja -C "$build" || { echo "test.sh: build failed"; exit 1; }

# Install check: a program outside the tree builds against an install through pkg-config alone.
# (No `set -e` here: it is off inside an `if` condition, subshells included; every step checks.)
install_check() {
  local tmp rc
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/kiln-install.XXXXXX") || return 1
  (
    meson install -C "$build" --no-rebuild --quiet --destdir "$tmp/root" || exit 1
    pc=$(find "$tmp/root" -name kiln.pc -path '*/pkgconfig/*' | head -n 1)
    [ -n "$pc" ] || { echo "test.sh: the install has no kiln.pc"; exit 1; }
    # The DESTDIR copy lives under $tmp/root: point kiln.pc's prefix there (kiln.pc only, not fmt's or pcre2's).
    sed -i "s|^prefix=\(.*\)|prefix=$tmp/root\1|" "$pc" || exit 1
    mkdir "$tmp/consumer" && cp tests/install/consumer.cpp "$tmp/consumer/" && cd "$tmp/consumer" || exit 1
    export PKG_CONFIG_PATH="$(dirname "$pc")"
    flags=$(pkg-config --cflags --libs kiln) || exit 1
    # Every installed header compiles on its own include path (the CUDA ones where CUDA was built).
    inc="$(pkg-config --variable=includedir kiln)/kiln"
    cuda=$(pkg-config --cflags kiln | grep -q KILN_WITH_CUDA && echo yes)
    (cd "$inc" && find . -name '*.h' | sort | sed 's|^\./||') | { [ -n "$cuda" ] && cat || grep -v '/cuda/'; } |
      sed 's|.*|#include "&"|' >all_headers.cpp
    # shellcheck disable=SC2046
    ${CXX:-c++} -std=c++20 -fsyntax-only all_headers.cpp $(pkg-config --cflags kiln) ||
      { echo "test.sh: an installed header does not compile from the install alone"; exit 1; }
    echo "test.sh: $(wc -l <all_headers.cpp) installed headers compile; c++ -std=c++20 consumer.cpp $flags"
    # shellcheck disable=SC2086
    ${CXX:-c++} -std=c++20 -o consumer consumer.cpp $flags && ./consumer || exit 1
    # The installed kiln finds the default job's files beside itself: two steps of it, the banner naming them.
    kiln=$(find "$tmp/root" -path '*/bin/kiln' -type f | head -n 1)
    [ -x "$kiln" ] || { echo "test.sh: the install has no bin/kiln"; exit 1; }
    share=$(cd "$(dirname "$kiln")/../share/kiln" && pwd -P) || { echo "test.sh: no share/kiln beside bin/kiln"; exit 1; }
    banner=$(env -u KILN_DEFAULT_BASE -u KILN_DEFAULT_CORPUS -u KILN_DEFAULT_TOKENIZER "$kiln" finetune --steps 2 \
      --seq-len 32 --batch-size 2 --eval-every 0 --save-every 0 --sample-tokens 0 --device cpu \
      --output "$tmp/run" 2>&1 | grep '^kiln finetune:') || { echo "test.sh: the installed kiln's default job failed"; exit 1; }
    echo "test.sh: installed $banner"
    case "$banner" in
      *"kiln finetune: $share/default/base,"*"docs of $share/corpus/devil.txt,"*) ;;
      *) echo "test.sh: the installed kiln did not take its base and corpus from $share"; exit 1 ;;
    esac
  )
  rc=$?
  rm -rf "$tmp"
  return $rc
}
check "install check" KILN_SKIP_INSTALL_CHECK "meson install, then tests/install/consumer.cpp through pkg-config kiln" \
  install_check

rm -f "$junit"
start=$(date +%s.%N)
"$bin" --reporter console::out=- --reporter junit::out="$junit" "$@"
rc=$?
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")

# Sanitizer run: the suite again, built with AddressSanitizer + UndefinedBehaviorSanitizer (one case).
sanitizers() {
  local asan=build-asan opts
  opts=(-Dcuda=disabled -Dwerror=false -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debugoptimized
        "-Dcpp_args=-fno-sanitize-recover=undefined -Wno-maybe-uninitialized")
  if [ -f "$asan/meson-private/coredata.dat" ]; then
    meson setup --reconfigure "$asan" "${opts[@]}" >/dev/null ||
      meson setup --wipe "$asan" "${opts[@]}" >/dev/null || return 1
  else
    rm -rf "$asan"
    meson setup "$asan" "${opts[@]}" >/dev/null || return 1
  fi
  ninja -C "$asan" tests/kiln_tests examples/kiln/kiln || return 1
  local filter=("$@")
  [ ${#filter[@]} -gt 0 ] || filter=("~[cuda]")
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    "$asan/tests/kiln_tests" "${filter[@]}"
}
check "sanitizer run" KILN_SKIP_SANITIZERS "build-asan/: kiln_tests under AddressSanitizer + UndefinedBehaviorSanitizer" \
  sanitizers "$@"
# Fuzz smoke: every libFuzzer target of tests/fuzz for a few seconds from its committed seeds (tools/fuzz.sh,
# clang, build-fuzz/; deterministic inputs: KILN_FUZZ_SMOKE=1). One case. KILN_FUZZ_SMOKE_SECONDS (default 10)
# per target; KILN_SKIP_FUZZ=1 skips it (counted as skipped).
fuzz_smoke() { KILN_FUZZ_SMOKE=1 tools/fuzz.sh "${KILN_FUZZ_SMOKE_SECONDS:-10}"; }
check "fuzz smoke run" KILN_SKIP_FUZZ "tools/fuzz.sh ${KILN_FUZZ_SMOKE_SECONDS:-10}: every target from its seeds" fuzz_smoke
listed="$build/test_names.txt"
"$bin" --list-tests --verbosity quiet "$@" >"$listed" 2>/dev/null || true

# Catch2's JUnit report has one <testcase> per section path ("Test case/section"); fold them back into
# test cases: failed if any part failed or errored, else skipped if any part was SKIP()ped, else passed.
# Test cases without assertions do not appear in the report and count as passed; when the report is
# missing (the binary died), every listed test case counts as failed.
summary=$(python3 - "$junit" "$listed" "$extra_passed" "$extra_failed" "$extra_skipped" <<'PY'
import os, sys
import xml.etree.ElementTree as ET
junit, listed = sys.argv[1], sys.argv[2]
extra = [int(v) for v in sys.argv[3:6]]  # the layer, install and sanitizer checks
names = [l for l in open(listed, encoding="utf-8", errors="replace").read().splitlines() if l]
status = {n: "passed" for n in names}
root = ET.parse(junit).getroot() if os.path.exists(junit) else None
if root is None:
    status = {n: "failed" for n in names} or {"kiln_tests": "failed"}
else:
    by_length = sorted(names, key=len, reverse=True)
    for tc in root.iter("testcase"):
        name = tc.get("name", "")
        owner = name if name in status else next((n for n in by_length if name.startswith(n + "/")), None)
        if owner is None:  # not listed (should not happen): its first path component
            owner = name.split("/")[0]
            status.setdefault(owner, "passed")
        if tc.find("failure") is not None or tc.find("error") is not None:
            status[owner] = "failed"
        elif tc.find("skipped") is not None and status[owner] != "failed":
            status[owner] = "skipped"
values = list(status.values())
passed, failed, skipped = (values.count(k) + e for k, e in zip(("passed", "failed", "skipped"), extra))
# The failed cases again, with their first failure and the seed that replays them (CI shows only the
# end of the output).
if root is not None and failed > extra[1]:
    seed = next((p.get("value") for p in root.iter("property") if p.get("name") == "random-seed"), None)
    if seed:
        print(f"test.sh: kiln_tests ran with --rng-seed {seed}", file=sys.stderr)
    for tc in root.iter("testcase"):
        f = tc.find("failure")
        if f is None:
            f = tc.find("error")
        if f is not None:
            text = " | ".join(l.strip() for l in (f.text or f.get("message", "")).strip().splitlines()[:6])
            print(f'test.sh: FAILED case "{tc.get("name", "")}": {text[:600]}', file=sys.stderr)
print(f'{passed} passed, {failed} failed, {skipped} skipped')
PY
) || summary="$extra_passed passed, $((extra_failed + 1)) failed, $extra_skipped skipped"

[ -f "$junit" ] || echo "test.sh: kiln_tests exited with status $rc without writing $junit"
echo "test.sh: kiln_tests ran in ${elapsed} s (exit status $rc); JUnit report in $junit"
echo "$summary"
failed=$(echo "$summary" | sed -E 's/.* ([0-9]+) failed.*/\1/')
if [ "$failed" != 0 ]; then exit 1; fi
exit "$rc"

#!/usr/bin/env bash
# The test command: installs dependencies (tools/bootstrap.sh; skip with KILN_SKIP_BOOTSTRAP=1), configures
# build-ci/ with -Dwerror=true, builds, runs the Catch2 suite with a console and a JUnit reporter, and ends
# with one line "N passed, N failed, N skipped" counting test cases. Arguments go to kiln_tests ("[autograd]").
# KILN_MESON_ARGS adds meson options (e.g. "-Dcpu_arch=native -Dcuda=disabled").
set -uo pipefail
cd "$(dirname "$0")/.."
build=build-ci
bin="$build/tests/kiln_tests"
junit="$build/junit.xml"
read -r -a extra <<<"${KILN_MESON_ARGS:-}"

if [ "${KILN_SKIP_BOOTSTRAP:-0}" != 1 ]; then
  tools/bootstrap.sh || { echo "test.sh: tools/bootstrap.sh failed"; exit 1; }
fi

# Idempotent configure: reuse an existing build dir (re-applying the options), else start afresh.
if [ -f "$build/meson-private/coredata.dat" ]; then
  meson setup --reconfigure "$build" -Dwerror=true "${extra[@]}" ||
    meson setup --wipe "$build" -Dwerror=true "${extra[@]}" || { echo "test.sh: meson setup failed"; exit 1; }
else
  rm -rf "$build"
  meson setup "$build" -Dwerror=true "${extra[@]}" || { echo "test.sh: meson setup failed"; exit 1; }
fi
ninja -C "$build" || { echo "test.sh: build failed"; exit 1; }

rm -f "$junit"
start=$(date +%s.%N)
"$bin" --reporter console::out=- --reporter junit::out="$junit" "$@"
rc=$?
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
listed="$build/test_names.txt"
"$bin" --list-tests --verbosity quiet "$@" >"$listed" 2>/dev/null || true

# Catch2's JUnit report has one <testcase> per section path ("Test case/section"); fold them back into
# test cases: failed if any part failed or errored, else skipped if any part was SKIP()ped, else passed.
# Test cases without assertions do not appear in the report and count as passed; when the report is
# missing (the binary died), every listed test case counts as failed.
summary=$(python3 - "$junit" "$listed" <<'PY'
import os, sys
import xml.etree.ElementTree as ET
junit, listed = sys.argv[1], sys.argv[2]
names = [l for l in open(listed, encoding="utf-8", errors="replace").read().splitlines() if l]
status = {n: "passed" for n in names}
if not os.path.exists(junit):
    status = {n: "failed" for n in names} or {"kiln_tests": "failed"}
else:
    by_length = sorted(names, key=len, reverse=True)
    for tc in ET.parse(junit).getroot().iter("testcase"):
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
print(f'{values.count("passed")} passed, {values.count("failed")} failed, {values.count("skipped")} skipped')
PY
) || summary="0 passed, 1 failed, 0 skipped"

[ -f "$junit" ] || echo "test.sh: kiln_tests exited with status $rc without writing $junit"
echo "test.sh: kiln_tests ran in ${elapsed} s (exit status $rc); JUnit report in $junit"
echo "$summary"
failed=$(echo "$summary" | sed -E 's/.* ([0-9]+) failed.*/\1/')
if [ "$failed" != 0 ]; then exit 1; fi
exit "$rc"

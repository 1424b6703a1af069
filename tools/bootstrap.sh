#!/usr/bin/env bash
# Installs everything kiln needs to build and test on a fresh Debian 12 (bookworm) machine:
# Meson 1.7 and Catch2 3 from bookworm-backports, fmt, ninja and a C++20 compiler from Debian.
# The CUDA toolkit is optional (the build is CPU-only where nvcc is absent).
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
fi
need=()
for p in g++ pkg-config ninja-build libfmt-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
bp=()
meson_ok=0; command -v meson >/dev/null && dpkg --compare-versions "$(meson --version)" ge 1.3 && meson_ok=1
[ $meson_ok = 1 ] || bp+=(meson)
dpkg -s catch2 >/dev/null 2>&1 && dpkg --compare-versions "$(dpkg-query -W -f='${Version}' catch2)" ge 3 || bp+=(catch2)
if [ ${#need[@]} -gt 0 ] || [ ${#bp[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  [ ${#need[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  [ ${#bp[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${bp[@]}"
fi
echo "bootstrap: meson $(meson --version), catch2 $(dpkg-query -W -f='${Version}' catch2), fmt $(dpkg-query -W -f='${Version}' libfmt-dev)"

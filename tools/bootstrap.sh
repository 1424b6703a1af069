#!/usr/bin/env bash
# Installs everything kiln needs to build and test on a fresh Debian 12 (bookworm) machine:
# Meson >= 1.3 and Catch2 3 from bookworm-backports; fmt, ninja, python3 and a C++20 compiler from Debian.
# The CUDA toolkit is optional (the build is CPU-only where nvcc is absent). Does nothing when all is there.
set -euo pipefail

if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
  # Not Debian: check, do not install.
  missing=()
  for c in c++ meson ninja pkg-config python3; do command -v "$c" >/dev/null || missing+=("$c"); done
  for p in fmt catch2-with-main; do pkg-config --exists "$p" 2>/dev/null || missing+=("$p (pkg-config)"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: not a Debian system and missing: ${missing[*]}; install them (Meson >= 1.3, Catch2 >= 3, fmt >= 9)" >&2
    exit 1
  fi
  echo "bootstrap: meson $(meson --version), catch2 $(pkg-config --modversion catch2-with-main), fmt $(pkg-config --modversion fmt)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "bootstrap: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

need=()
for p in g++ pkg-config ninja-build libfmt-dev python3; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
bp=()
meson_ok=0
command -v meson >/dev/null && dpkg --compare-versions "$(meson --version)" ge 1.3 && meson_ok=1
[ $meson_ok = 1 ] || bp+=(meson)
catch2_version=$(dpkg-query -W -f='${Version}' libcatch2-dev 2>/dev/null || dpkg-query -W -f='${Version}' catch2 2>/dev/null || echo 0)
dpkg --compare-versions "$catch2_version" ge 3 || bp+=(catch2)

if [ ${#need[@]} -gt 0 ] || [ ${#bp[@]} -gt 0 ]; then
  if [ ${#bp[@]} -gt 0 ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
      $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
  fi
  $SUDO apt-get update -qq
  [ ${#need[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  [ ${#bp[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${bp[@]}"
fi
echo "bootstrap: meson $(meson --version), catch2 $(dpkg-query -W -f='${Version}' libcatch2-dev 2>/dev/null ||
  dpkg-query -W -f='${Version}' catch2), fmt $(dpkg-query -W -f='${Version}' libfmt-dev)"

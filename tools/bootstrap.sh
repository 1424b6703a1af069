#!/usr/bin/env bash
# Installs everything kiln needs to build and test on a fresh Debian 12 (bookworm) machine:
# Meson >= 1.3 and Catch2 3 from bookworm-backports; fmt, ninja, python3, a C++20 compiler and clang with
# libFuzzer (tools/fuzz.sh) from Debian.
# The CUDA toolkit is optional (the build is CPU-only where nvcc is absent). Does nothing when all is there.
# --test-tools (tools/test.sh passes it) also installs llama-cpp-python, which builds llama.cpp from source
# (about 5 minutes on 2 cores, once), for the [export] test that runs kiln's GGUF files in llama.cpp.
set -euo pipefail
test_tools=0
for arg in "$@"; do
  case $arg in
    --test-tools) test_tools=1 ;;
    *) echo "bootstrap: unknown argument '$arg' (the one argument is --test-tools)" >&2; exit 2 ;;
  esac
done

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
# clang + libclang-rt-14-dev: the fuzz build (tools/fuzz.sh; -Dfuzz=true): libclang-rt-14-dev holds libFuzzer and the
# clang sanitizer runtimes, only recommended by clang-14 (so not pulled in with --no-install-recommends).
for p in g++ pkg-config ninja-build libfmt-dev libpcre2-dev nlohmann-json3-dev libcli11-dev libtomlplusplus-dev libgloo-dev python3 bible-kjv \
  clang libclang-rt-14-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
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

# The default base's pretraining corpus (data/default_corpus.h, tools/make_default_base.sh): the King James
# Bible (public domain) from bible-kjv, as plain text in third_party/corpus/kjv.txt: one chapter per document
# ("Genesis 1", then one verse per line), documents split by blank lines.
corpus_dir="$(cd "$(dirname "$0")/.." && pwd)/third_party/corpus"
if [ ! -s "$corpus_dir/kjv.txt" ]; then
  mkdir -p "$corpus_dir"
  bible -l100000 gen1:1-rev22:21 </dev/null |
    awk '/^$/ {next} /^ +[0-9]+ / {sub(/^ +[0-9]+ /, ""); print; next} {if (n++) print ""; print}' >"$corpus_dir/kjv.txt.tmp"
  chapters=$(grep -c '^$' "$corpus_dir/kjv.txt.tmp" || true)
  if [ "$chapters" = 1188 ]; then
    mv "$corpus_dir/kjv.txt.tmp" "$corpus_dir/kjv.txt"
    echo "bootstrap: default corpus in third_party/corpus/kjv.txt (1189 chapters)"
  else
    rm -f "$corpus_dir/kjv.txt.tmp"
    echo "bootstrap: bible-kjv printed an unexpected text ($chapters chapter breaks); no default corpus" >&2
    exit 1
  fi
fi

# The default fine-tuning corpus (data/default_corpus.h): Ambrose Bierce's The Devil's Dictionary (1911, public
# domain) from dict-devil, one entry per document in third_party/corpus/devil.txt (tools/make_devil_corpus.py).
# The package is downloaded and unpacked, not installed: it depends on dictd, a network daemon kiln has no use for.
if [ ! -s "$corpus_dir/devil.txt" ]; then
  tmp=$(mktemp -d)
  [ "$(id -u)" -ne 0 ] || chown _apt "$tmp" 2>/dev/null || true  # apt's download sandbox user writes there
  if ! (cd "$tmp" && apt-get download -qq dict-devil); then
    $SUDO apt-get update -qq  # no package lists yet (a fresh image)
    (cd "$tmp" && apt-get download -qq dict-devil) || { rm -rf "$tmp"; echo "bootstrap: cannot download dict-devil" >&2; exit 1; }
  fi
  dpkg-deb -x "$tmp"/dict-devil_*.deb "$tmp/x" &&
    python3 "$(dirname "$0")/make_devil_corpus.py" "$tmp/x/usr/share/dictd" "$corpus_dir/devil.txt" ||
    { rm -rf "$tmp"; echo "bootstrap: could not write third_party/corpus/devil.txt from dict-devil" >&2; exit 1; }
  rm -rf "$tmp"
fi

# The cuDNN C++ frontend (header-only) for the CUDA backend, from its PyPI wheel, into third_party/.
frontend_version=1.32.0
frontend_dir="$(cd "$(dirname "$0")/.." && pwd)/third_party/cudnn_frontend"
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  if [ ! -f "$frontend_dir/include/cudnn_frontend.h" ] || [ "$(cat "$frontend_dir/VERSION" 2>/dev/null)" != "$frontend_version" ]; then
    tmp=$(mktemp -d)
    if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
         -d "$tmp" "nvidia-cudnn-frontend==$frontend_version" &&
       python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith('include/')]" \
         "$(ls "$tmp"/*.whl | head -n 1)" "$tmp/x"; then
      rm -rf "$frontend_dir" && mkdir -p "$frontend_dir" && mv "$tmp/x/include" "$frontend_dir/include"
      echo "$frontend_version" >"$frontend_dir/VERSION"
      echo "bootstrap: cuDNN frontend $frontend_version headers in third_party/cudnn_frontend"
    else
      echo "bootstrap: could not fetch the cuDNN frontend headers; CUDA will be left out of -Dcuda=auto builds" >&2
    fi
    rm -rf "$tmp"
  fi
fi

# Python packages the checks in tools/ use: numpy and gguf (llama.cpp's gguf-py, read by tools/check_gguf.py,
# which the [export] test runs when `import gguf` works); with --test-tools also llama-cpp-python (llama.cpp
# itself, run by tools/check_gguf_llamacpp.py). Optional: a failure here only makes those checks skip.
pip_install() {  # pip_install IMPORTS WHAT PACKAGE...: installs the packages unless `import IMPORTS` works
  local imports=$1 what=$2
  shift 2
  python3 -c "import $imports" >/dev/null 2>&1 && return
  if python3 -m pip install -q --user "$@" >/dev/null 2>&1 ||
     python3 -m pip install -q --user --break-system-packages "$@" >/dev/null 2>&1 ||
     python3 -m pip install -q "$@" >/dev/null 2>&1; then
    echo "bootstrap: python packages $* installed ($what)"
  else
    echo "bootstrap: could not pip install $*; $what will be skipped" >&2
  fi
}
pip_install "gguf, numpy" "tools/check_gguf.py, the [export] GGUF check" gguf numpy
if [ $test_tools = 1 ]; then
  # llama.cpp's CPU backend only, without its programs and multimodal library: what llama_cpp.Llama needs.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    pip_install "llama_cpp, numpy" "tools/check_gguf_llamacpp.py, the [export] llama.cpp check" llama-cpp-python==0.3.36
fi

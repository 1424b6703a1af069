#!/usr/bin/env python3
"""Layer check: every #include between kiln's folders must point down the layer order.

LAYERS below is the one table of allowed dependencies (docs/ARCHITECTURE.md points here). The script
scans every #include "..." (and #include <...> that names a file of the repository) in .h/.hpp/.cpp/
.cu/.cuh files of the folders in the table, and prints one line per offence:

    core/print.cpp:6 includes autograd/grad_mode.h: core may include only core

It also flags a C++ file in a top-level folder missing from the table (a new library must be given
its row before it builds). An include resolves as the compiler does: next to the including file
first, else from the repository root (the build's include directory). An include that names no file
of the repository but starts with a folder of the table (a generated header such as
data/default_paths.h) counts for that folder; anything else is external and ignored.

    tools/check_layers.py              check the repository (exit 1 on any offence)
    tools/check_layers.py --root DIR   check another tree laid out like it
    tools/check_layers.py --self-test  plant wrong-way includes in a scratch tree, prove they fail
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

# folder -> folders its files may include (itself included). Libraries, bottom to top; one static
# library per folder (kiln_<folder>), linked whole. data/ sits beside the model stack (core only).
LIBRARIES = {
    "core": ["core"],
    "autograd": ["core", "autograd"],
    "io": ["core", "autograd", "io"],
    "quant": ["core", "autograd", "io", "quant"],
    "data": ["core", "data"],
    "nn": ["core", "autograd", "io", "quant", "nn"],
    "train": ["core", "autograd", "io", "quant", "data", "nn", "train"],
    "dist": ["core", "autograd", "io", "quant", "data", "nn", "train", "dist"],
    "compile": ["core", "autograd", "io", "quant", "data", "nn", "train", "compile"],
}
_ALL = list(LIBRARIES)
# Programs and their helpers: any library; no library includes these. bench/ does not include tests/;
# C++ shared by tests/ and bench/ (fixture mirrors of tools/*.py) lives in tools/.
LAYERS = dict(LIBRARIES)
LAYERS.update({
    "tools": _ALL + ["tools"],
    "examples": _ALL + ["examples"],
    "bench": _ALL + ["bench", "tools"],
    "tests": _ALL + ["examples", "tests", "tools"],
})
# Top-level folders that hold no kiln C++ (or only others' code) and are not checked.
IGNORED = {"third_party", "docs", "subprojects", ".git", ".ci"}

EXTENSIONS = (".h", ".hpp", ".cpp", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s*(?:"([^"]+)"|<([^>]+)>)')


def source_files(root):
    """Repository-relative paths of the C++ files to check: git's tracked and untracked-but-not-ignored
    files when root is a git work tree (build trees and third_party/ are ignored there), else a walk
    that skips build trees."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode("utf-8", "replace")
        files = [f for f in out.split("\0") if f]
        if os.path.realpath(subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True,
                                           check=True, text=True).stdout.strip()) != os.path.realpath(root):
            raise OSError("root is inside another repository")
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            rel = os.path.relpath(d, root)
            dirs[:] = sorted(x for x in dirs if not (x.startswith(".") or x.startswith("build") or
                                                     (rel == "." and x in IGNORED) or
                                                     os.path.exists(os.path.join(d, x, "meson-private"))))
            files += [os.path.normpath(os.path.join(rel, n)) for n in names]
    return sorted(f for f in files if f.endswith(EXTENSIONS) and os.path.isfile(os.path.join(root, f)))


def resolve(root, path, target):
    """The repository-relative path an include names: next to the including file, else from the root."""
    here = os.path.normpath(os.path.join(os.path.dirname(path), target))
    if not here.startswith("..") and os.path.isfile(os.path.join(root, here)):
        return here, True
    top = os.path.normpath(target)
    return top, os.path.isfile(os.path.join(root, top))


def check(root):
    """Offences as lines, in file order."""
    offences = []
    for path in source_files(root):
        parts = path.replace(os.sep, "/").split("/")
        folder = parts[0] if len(parts) > 1 else None
        if folder in IGNORED:
            continue
        if folder not in LAYERS:
            where = f"folder {folder}/" if folder else "the repository root"
            offences.append(f"{path}: {where} is not in the layer table (tools/check_layers.py LAYERS)")
            continue
        allowed = LAYERS[folder]
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                quoted = m.group(1) is not None
                target = m.group(1) if quoted else m.group(2)
                rel, exists = resolve(root, path, target)
                rel = rel.replace(os.sep, "/")
                to = rel.split("/")[0] if "/" in rel else None
                if not exists and not (quoted and to in LAYERS) or to in IGNORED:
                    continue  # a system or third-party header
                if to not in LAYERS:
                    offences.append(f"{path}:{lineno} includes {rel}: not in a folder of the layer table")
                elif to not in allowed:
                    offences.append(f"{path}:{lineno} includes {rel}: {folder} may include only {', '.join(allowed)}")
    return offences


def self_test():
    """Plants good and wrong-way includes in a scratch tree; the checker must flag exactly the bad ones."""
    tree = {
        "core/tensor.h": '#pragma once\n#include <vector>\n#include "core/dtype.h"\n',
        "core/dtype.h": "#pragma once\n",
        "core/cpu/parallel.h": "#pragma once\n",
        "core/cpu/gemm.cpp": '#include "parallel.h"\n#include "core/tensor.h"\n',
        "autograd/grad_mode.h": '#pragma once\n#include "core/tensor.h"\n',
        "core/print.cpp": '// prints tensors\n#include <cstdio>\n\n#include "core/tensor.h"\n\n#include "autograd/grad_mode.h"\n',
        "data/tokenizer.cpp": '#include "data/default_paths.h"\n#include "core/tensor.h"\n  #  include "nn/module.h"\n',
        "nn/module.h": '#pragma once\n#include "autograd/grad_mode.h"\n#include <nlohmann/json.hpp>\n',
        "nn/layers.cpp": '#include "../tests/helpers.h"\n#include "quant/nf4.h"\n',
        "quant/nf4.h": '#pragma once\n#include <core/tensor.h>\n#include <nn/module.h>\n',
        "tests/helpers.h": '#pragma once\n#include "nn/module.h"\n#include "tools/corpus.h"\n',
        "tools/corpus.h": "#pragma once\n",
        "bench/enc.cpp": '#include "tools/corpus.h"\n#include "tests/helpers.h"\n',
        "newlib/thing.cpp": '#include "core/tensor.h"\n',
        "newlib/thing.h": "#pragma once\n",
        "io/file.cpp": '#include "third_party/x/y.h"\n#include "newlib/thing.h"\n',
        "third_party/x/y.h": '#include "nn/module.h"\n',
        "build-x/meson-private/z.cpp": '#include "nn/module.h"\n',
    }
    expected = [
        "bench/enc.cpp:2 includes tests/helpers.h: bench may include only " + ", ".join(LAYERS["bench"]),
        "core/print.cpp:6 includes autograd/grad_mode.h: core may include only core",
        "data/tokenizer.cpp:3 includes nn/module.h: data may include only core, data",
        "io/file.cpp:2 includes newlib/thing.h: not in a folder of the layer table",
        "newlib/thing.cpp: folder newlib/ is not in the layer table (tools/check_layers.py LAYERS)",
        "newlib/thing.h: folder newlib/ is not in the layer table (tools/check_layers.py LAYERS)",
        "nn/layers.cpp:1 includes tests/helpers.h: nn may include only core, autograd, io, quant, nn",
        "quant/nf4.h:3 includes nn/module.h: quant may include only core, autograd, io, quant",
    ]
    with tempfile.TemporaryDirectory() as root:
        for rel, text in tree.items():
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
                f.write(text)
        found = check(root)
        if found != expected:
            print("check_layers self-test FAILED\nexpected:\n  " + "\n  ".join(expected) + "\nfound:\n  " +
                  "\n  ".join(found))
            return 1
        # Fixing the planted includes makes the tree pass.
        fixes = {"core/print.cpp": '#include "core/tensor.h"\n', "data/tokenizer.cpp": '#include "core/dtype.h"\n',
                 "nn/layers.cpp": '#include "quant/nf4.h"\n', "quant/nf4.h": '#include "core/tensor.h"\n',
                 "bench/enc.cpp": '#include "tools/corpus.h"\n#include "nn/module.h"\n'}
        for rel, text in fixes.items():
            with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
                f.write(text)
        shutil.rmtree(os.path.join(root, "newlib"))
        os.remove(os.path.join(root, "io/file.cpp"))
        found = check(root)
        if found:
            print("check_layers self-test FAILED: a clean tree reports\n  " + "\n  ".join(found))
            return 1
    print(f"check_layers self-test: {len(expected)} planted offences found, clean tree passes")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--self-test", action="store_true", help="prove the checker fails on planted wrong-way includes")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    root = os.path.abspath(args.root)
    offences = check(root)
    for line in offences:
        print(line)
    n = len(source_files(root))
    if offences:
        print(f"check_layers: {len(offences)} wrong-way include(s) or unlisted folder(s) in {n} files "
              "(allowed dependencies: LAYERS in tools/check_layers.py, docs/ARCHITECTURE.md)")
        return 1
    print(f"check_layers: {n} files, every include points down the layer order")
    return 0


if __name__ == "__main__":
    sys.exit(main())

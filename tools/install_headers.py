#!/usr/bin/env python3
"""Meson install script: copies the headers (.h, .hpp, .cuh) of kiln's library folders into
<includedir>/kiln/<folder>/..., keeping their paths, so `#include "core/tensor.h"` works with
-I<prefix>/include/kiln. Headers written in the source tree come first, then those generated into the
same folders of the build tree (configure_file outputs such as dist/config.h). It walks the folders
at install time, so headers added or renamed by anyone are installed without a list to keep.

Usage (meson.build): install_headers.py INCLUDEDIR FOLDER...   INCLUDEDIR is relative to the prefix
(or absolute). MESON_SOURCE_ROOT, MESON_BUILD_ROOT, MESON_INSTALL_DESTDIR_PREFIX, DESTDIR,
MESON_INSTALL_DRY_RUN and MESON_INSTALL_QUIET come from `meson install`.
"""
import os
import shutil
import sys

HEADERS = (".h", ".hpp", ".cuh")


def headers(top, folder):
    """(source path, path relative to top) of every header under top/folder; skips hidden folders and
    the build tree's per-target private folders (*.p)."""
    for d, dirs, names in os.walk(os.path.join(top, folder)):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not x.endswith(".p"))
        for name in sorted(names):
            if name.endswith(HEADERS):
                path = os.path.join(d, name)
                yield path, os.path.relpath(path, top)


def main():
    includedir, folders = sys.argv[1], sys.argv[2:]
    if os.path.isabs(includedir):
        destdir = os.environ.get("DESTDIR", "")
        dest = os.path.join(destdir, includedir.lstrip("/")) if destdir else includedir
    else:
        dest = os.path.join(os.environ["MESON_INSTALL_DESTDIR_PREFIX"], includedir)
    dry = bool(os.environ.get("MESON_INSTALL_DRY_RUN"))
    count = 0
    for top in (os.environ["MESON_SOURCE_ROOT"], os.environ["MESON_BUILD_ROOT"]):
        for folder in folders:
            for src, rel in headers(top, folder):
                dst = os.path.join(dest, rel)
                count += 1
                if dry:
                    print(f"Installing {src} to {os.path.dirname(dst)}")
                    continue
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
    if not os.environ.get("MESON_INSTALL_QUIET"):
        print(f"Installed {count} kiln headers ({', '.join(folders)}) to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

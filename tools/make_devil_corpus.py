#!/usr/bin/env python3
"""Writes the default fine-tuning corpus: Ambrose Bierce's The Devil's Dictionary (1911, public domain)
from Debian's dict-devil package, as plain text with one entry per document and documents separated by
blank lines (the default corpora's format, data/default_corpus.h).

    tools/make_devil_corpus.py DIR OUT.txt

DIR holds dict-devil's devil.dict.dz (the text, gzip) and devil.index (one line per headword: the word,
then the entry's byte offset and length in dictd's base64 digits). tools/bootstrap.sh runs this.

Each entry keeps its own text ("ABASEMENT, n.  A decent and customary mental attitude...", any verses
indented under it) with three changes: the blank lines inside an entry are dropped (a blank line ends a
document), trailing spaces are cut, and the right-aligned signatures under verses (40 or more spaces of
indentation, e.g. "G.J.") are indented like the verses (4 spaces). The dictionary's own header entries
(00database...) are left out, and headwords that point at the same text (aliases) give one document.
"""
import gzip
import os
import sys

DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + DIGITS.index(ch)
    return n


def entry_text(raw: str) -> str:
    lines = []
    for line in raw.splitlines():
        line = line.rstrip()
        if not line:
            continue
        indent = len(line) - len(line.lstrip(" "))
        lines.append("    " + line.lstrip(" ") if indent >= 40 else line)
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: tools/make_devil_corpus.py DIR OUT.txt (DIR holds devil.dict.dz and devil.index)", file=sys.stderr)
        return 2
    src, out = sys.argv[1], sys.argv[2]
    text = gzip.open(os.path.join(src, "devil.dict.dz")).read().decode("ascii")
    spans = set()
    with open(os.path.join(src, "devil.index"), encoding="ascii") as index:
        for n, line in enumerate(index, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                print(f"make_devil_corpus: devil.index:{n}: expected 3 tab-separated fields", file=sys.stderr)
                return 1
            word, offset, length = fields
            if not word.startswith("00database"):
                spans.add((dictd_number(offset), dictd_number(length)))
    docs = [entry_text(text[o:o + n]) for o, n in sorted(spans)]
    docs = [d for d in docs if d]
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write("\n\n".join(docs) + "\n")
    os.replace(tmp, out)
    print(f"make_devil_corpus: {len(docs)} entries in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

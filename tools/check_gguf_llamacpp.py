#!/usr/bin/env python3
"""Runs a GGUF file written by `kiln export --format gguf` in llama.cpp (through llama-cpp-python, which
builds llama.cpp from source) and compares what llama.cpp computes with what kiln computed:

    tools/check_gguf_llamacpp.py MODEL.gguf --ids IDS.jsonl --logits EVAL.jsonl --tol 0.01 [--lora ADAPTER.gguf]
    tools/check_gguf_llamacpp.py MODEL.gguf --tokens TOKENS.jsonl

--ids/--logits: IDS.jsonl has one JSON array of token ids per line (what `kiln eval --ids` reads), EVAL.jsonl
is `kiln eval --logits` over it, with the unmerged base and adapter. llama.cpp evaluates each sequence with
logits for every position (with --lora, the base MODEL.gguf plus that LoRA file, as `llama-cli --lora` runs
them: `kiln export --format gguf-lora`); per sequence, max |llama.cpp - kiln| / max |kiln| must be at most --tol, and at
every position llama.cpp's top token must be one kiln also ranks at the top, up to that tolerance (kiln's logit
for it within tol * max |kiln| of kiln's largest).

--tokens: one JSON object per line, {"text": ..., "ids": [...], "add_bos": bool, "special": bool}, the ids
being kiln's tokenizer's; llama.cpp's tokenizer (from the file's vocabulary, merges and pre-tokenizer name)
must give the same ids.

Prints one line per sequence or text and exits 1 if any check fails. Needs numpy and llama_cpp
(`pip install llama-cpp-python`; tools/bootstrap.sh --test-tools installs it).
"""
import argparse
import json
import sys

import numpy as np
from llama_cpp import Llama


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_logits(llm, ids_path, eval_path, tol):
    seqs = read_jsonl(ids_path)
    evals = read_jsonl(eval_path)
    if len(seqs) != len(evals):
        return [f"{ids_path} has {len(seqs)} sequences, {eval_path} {len(evals)}"]
    problems = []
    for i, (ids, ev) in enumerate(zip(seqs, evals)):
        if "logits" not in ev:
            problems.append(f"{eval_path}: line {i + 1} has no logits (run kiln eval with --logits)")
            continue
        want = np.asarray(ev["logits"], dtype=np.float64)  # (T, V)
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)
        if got.shape != want.shape:
            problems.append(f"sequence {i}: llama.cpp logits {got.shape}, kiln {want.shape}")
            continue
        scale = np.abs(want).max()
        rel = np.abs(got - want).max() / scale
        top = got.argmax(-1)
        # kiln's logit for llama.cpp's top token, against kiln's largest: a tie broken the other way is fine
        gap = want.max(-1) - want[np.arange(len(ids)), top]
        same_top = float((top == want.argmax(-1)).mean())
        print(f"sequence {i}: {len(ids)} tokens, max |llama.cpp - kiln| / max |kiln| = {rel:.3g} (tol {tol:g}), "
              f"same top token at {same_top:.0%} of positions")
        if not rel <= tol:
            problems.append(f"sequence {i}: relative error {rel:.3g} > {tol:g}")
        if not (gap <= tol * scale).all():
            t = int(np.argmax(gap))
            problems.append(f"sequence {i}, position {t}: llama.cpp's top token {top[t]} is {gap[t]:.4g} below kiln's top")
    return problems


def check_tokens(llm, path):
    problems = []
    for i, r in enumerate(read_jsonl(path)):
        got = llm.tokenize(r["text"].encode("utf-8"), add_bos=r.get("add_bos", False), special=r.get("special", False))
        want = r["ids"]
        ok = list(got) == list(want)
        print(f"text {i}: {len(want)} ids, {'equal' if ok else 'DIFFERENT'}")
        if not ok:
            n = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
            problems.append(f"text {i} ({r['text'][:40]!r}...): first difference at id {n}: "
                            f"llama.cpp {list(got[n:n + 5])}, kiln {want[n:n + 5]}")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--ids")
    p.add_argument("--logits")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--tokens")
    p.add_argument("--lora")
    a = p.parse_args()
    if bool(a.ids) != bool(a.logits) or not (a.ids or a.tokens):
        p.error("give --ids with --logits, and/or --tokens")
    n_ctx = 16
    if a.ids:
        n_ctx = max(n_ctx, max(len(s) for s in read_jsonl(a.ids)))
    llm = Llama(model_path=a.gguf, lora_path=a.lora, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2,
                seed=0)
    problems = []
    if a.ids:
        problems += check_logits(llm, a.ids, a.logits, a.tol)
    if a.tokens:
        problems += check_tokens(llm, a.tokens)
    for m in problems:
        print(f"{a.gguf}: {m}")
    print(f"{a.gguf}: {'FAILED' if problems else 'passed'} ({len(problems)} problems)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

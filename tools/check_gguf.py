#!/usr/bin/env python3
"""Checks a GGUF file written by `kiln export --format gguf` against the Hugging Face folder of the same
merged model (`kiln export --format hf --dtype f32`), reading the GGUF with the `gguf` package (PyPI,
llama.cpp's gguf-py) so that the check does not share code with kiln's writer.

    tools/check_gguf.py MODEL.gguf HF_DIR --type f16|bf16|q8_0

Checks: GGUF v3 and llama metadata (architecture, context/embedding/feed-forward lengths, block count,
head counts, rope base and dimension count, rms epsilon, vocab size) equal config.json; the tokenizer
keys (gpt2 model, tokens and merges as tokenizer.json spells them, token types, bos/eos ids); every
tensor is there under llama.cpp's name with the expected type (matrices --type, Q8_0 falling back to
f16 for rows not a multiple of 32; 1-d tensors f32), and its bytes equal what gguf-py makes of the
safetensors tensor (q/k rows permuted as convert_hf_to_gguf permutes them; f16 by numpy's rounding,
bf16 and Q8_0 by gguf.quants.quantize); Q8_0 also dequantises to within half a step of the original.
Prints one line per problem and exits 1 if there is any; prints a summary and exits 0 otherwise.
Needs numpy and gguf (tools/bootstrap.sh installs them with pip).
"""
import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T


def read_safetensors(path):
    """name -> float32 numpy array (F32, F16 and BF16 files)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "F32":
            a = np.frombuffer(raw, dtype=np.float32)
        elif info["dtype"] == "F16":
            a = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: {name}: unsupported dtype {info['dtype']}")
        out[name] = a.reshape(info["shape"])
    return out


def read_hf(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(folder, f)))
    return tensors


def permute(w, n_head):
    """convert_hf_to_gguf's LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in BLOCK:
        return f"model.layers.{m.group(1)}.{BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def rope_factors(cfg):
    """convert_hf_to_gguf's llama3 rope factors."""
    s = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (np.float32(cfg.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    old = s.get("original_max_position_embeddings", 8192)
    lo, hi, factor = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0), s.get("factor", 8.0)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf_file")
    ap.add_argument("hf_dir")
    ap.add_argument("--type", choices=["f16", "bf16", "q8_0"], required=True)
    args = ap.parse_args()
    problems = []
    reader = gguf.GGUFReader(args.gguf_file)
    cfg = json.load(open(os.path.join(args.hf_dir, "config.json")))
    tok = json.load(open(os.path.join(args.hf_dir, "tokenizer.json")))

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            problems.append(f"metadata: {key} is missing")
            return None
        return f.contents()

    version = field("GGUF.version")
    if version != 3:
        problems.append(f"GGUF version {version}, expected 3")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    want = {
        "general.architecture": "llama",
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": cfg["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
    }
    for key, value in want.items():
        got = field(key)
        if got is not None and got != value:
            problems.append(f"metadata: {key} = {got!r}, expected {value!r}")
    for key, value in {"llama.rope.freq_base": cfg.get("rope_theta", 10000.0),
                       "llama.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"]}.items():
        got = field(key)
        if got is not None and got != float(np.float32(value)):
            problems.append(f"metadata: {key} = {got!r}, expected {value!r} (as f32)")

    # Tokenizer: tokens by id as tokenizer.json spells them, merges in order, special ids.
    tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if tokens is not None and types is not None:
        if len(tokens) != cfg["vocab_size"] or len(types) != len(tokens):
            problems.append(f"tokenizer: {len(tokens)} tokens and {len(types)} types, expected {cfg['vocab_size']}")
        for i, t in enumerate(tokens):
            want_t = by_id.get(i, f"[PAD{i}]")
            want_type = 5 if i not in by_id else (3 if added.get(i, {}).get("special") else 4 if i in added else 1)
            if t != want_t or (i < len(types) and types[i] != want_type):
                problems.append(f"tokenizer: token {i} is {t!r} of type {types[i] if i < len(types) else '?'}, "
                                f"expected {want_t!r} of type {want_type}")
                break
    want_merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    if merges is not None and merges != want_merges:
        problems.append(f"tokenizer: {len(merges)} merges differ from tokenizer.json's {len(want_merges)}")
    for key, content in (("tokenizer.ggml.bos_token_id", "<|begin_of_text|>"), ("tokenizer.ggml.eos_token_id", None)):
        got = field(key)
        if got is not None and content is not None and tokens is not None and tokens[got] != content:
            problems.append(f"tokenizer: {key} = {got} ({tokens[got]!r}), expected {content!r}")

    # Tensors.
    hf = read_hf(args.hf_dir)
    qtype = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[args.type]
    seen = set()
    checked = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # rows first
        if t.name == "rope_freqs.weight":
            if "rope_scaling" not in cfg or not cfg["rope_scaling"]:
                problems.append("rope_freqs.weight written for a config without rope_scaling")
                continue
            got = np.asarray(t.data, dtype=np.float32).reshape(-1)
            want_f = rope_factors(cfg)
            if t.tensor_type != T.F32 or got.shape != want_f.shape or not np.allclose(got, want_f, rtol=1e-6, atol=0):
                problems.append(f"rope_freqs.weight: {got} differs from {want_f}")
            seen.add("rope_freqs.weight")
            continue
        key = hf_name(t.name)
        if key is None or key not in hf:
            problems.append(f"{t.name}: no tensor {key} in {args.hf_dir}")
            continue
        seen.add(key)
        ref = hf[key].astype(np.float32)
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            ref = permute(ref, cfg["num_attention_heads"])
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            ref = permute(ref, cfg["num_key_value_heads"])
        if shape != ref.shape:
            problems.append(f"{t.name}: shape {shape}, expected {ref.shape} ({key})")
            continue
        want_type = T.F32 if ref.ndim == 1 else qtype
        if want_type == T.Q8_0 and ref.shape[-1] % 32 != 0:
            want_type = T.F16  # convert_hf_to_gguf's fallback
        if t.tensor_type != want_type:
            problems.append(f"{t.name}: type {t.tensor_type.name}, expected {want_type.name}")
            continue
        data = np.asarray(t.data)
        if want_type == T.F32:
            ok = np.array_equal(data.reshape(ref.shape), ref)
        elif want_type == T.F16:
            ok = np.array_equal(data.reshape(ref.shape).view(np.uint16), ref.astype(np.float16).view(np.uint16))
        else:
            ok = np.array_equal(data.reshape(-1), gguf.quants.quantize(ref, want_type).reshape(-1))
            deq = gguf.quants.dequantize(data, want_type).reshape(ref.shape)
            if want_type == T.Q8_0:  # half a step, plus up to 127 times the f16 rounding of the step
                step = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / np.float32(127)
                bound = 0.5 * step + 127 * np.abs(step.astype(np.float16).astype(np.float32) - step)
                err = np.abs(deq.reshape(-1, 32) - ref.reshape(-1, 32))
                if (err > bound * (1 + 1e-5) + 1e-9).any():
                    problems.append(f"{t.name}: Q8_0 dequantises {err.max()} away from the original")
            elif not np.allclose(deq, ref, rtol=2 ** -8, atol=0):
                problems.append(f"{t.name}: bf16 dequantises too far from the original")
        if not ok:
            problems.append(f"{t.name}: bytes differ from gguf-py's {want_type.name} of {key}")
        checked[want_type.name] = checked.get(want_type.name, 0) + 1
    for key in hf:
        if key not in seen and not (key == "lm_head.weight" and cfg.get("tie_word_embeddings")):
            problems.append(f"{key}: missing from the GGUF file")

    for p in problems:
        print(f"check_gguf: {p}")
    if problems:
        return 1
    print(f"check_gguf: {args.gguf_file}: GGUF v3, llama metadata and {len(tokens)} tokens / {len(merges)} merges match; "
          f"{len(reader.tensors)} tensors equal the safetensors export ({', '.join(f'{n} {k}' for k, n in sorted(checked.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

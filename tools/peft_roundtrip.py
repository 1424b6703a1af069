#!/usr/bin/env python3
# Checks that a LoRA adapter written by kiln loads in HF peft and reproduces kiln's logits:
#   peft_roundtrip.py --model HF_DIR --adapter KILN_ADAPTER_DIR --expected FILE.safetensors
#                     [--device cpu|cuda] [--dtype f32|bf16] [--tol X] [--key logits] [--no-adapter]
# Loads LlamaForCausalLM (any causal LM) from HF_DIR, applies the adapter with PeftModel.from_pretrained,
# checks every tensor of adapter_model.safetensors was loaded into the model unchanged (peft only warns
# about unknown keys), runs `input_ids` from FILE and compares with FILE's `logits` (or --key). Prints the
# max abs and max relative error (|d| / max|expected|); exit status 1 above --tol, 2 on a load problem.
# Needs torch, transformers, peft, safetensors; no network (local dirs only). Works with transformers 4.4x+
# and 5.x, e.g. /opt/torch/.venv/bin/python tools/peft_roundtrip.py ... --device cuda --dtype bf16
import argparse
import os
import sys

import torch
from safetensors.torch import load_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_TOL = {"f32": 1e-4, "bf16": 1.5e-1}


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Load a kiln-written LoRA adapter in HF peft and compare logits.")
    ap.add_argument("--model", required=True, help="HF model dir (config.json + model.safetensors)")
    ap.add_argument("--adapter", required=True, help="peft adapter dir (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--expected", required=True, help="safetensors file with input_ids and logits")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES), help="model compute dtype (default f32)")
    ap.add_argument("--tol", type=float, default=None, help="max abs error allowed (default 1e-4 f32, 0.15 bf16)")
    ap.add_argument("--key", default="logits", help="tensor of --expected to compare with (default logits)")
    ap.add_argument("--no-adapter", action="store_true", help="also run with the adapter disabled and compare "
                    "that with --key instead (e.g. --key logits_base)")
    ap.add_argument("--attn", default="eager", help="attn_implementation (default eager)")
    return ap.parse_args(argv)


def load_model(model_dir, attn):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, local_files_only=True)
    except TypeError:  # very old transformers without attn_implementation
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return model.float().eval()


def check_adapter_loaded(model, adapter_dir):
    """Every tensor of the adapter file must be in the peft model, bit-identical (f32 load); returns problems."""
    from peft.utils import get_peft_model_state_dict
    file_tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    problems = []
    for k in sorted(set(file_tensors) - set(loaded)):
        problems.append(f"adapter key not used by peft: {k}")
    for k in sorted(set(loaded) - set(file_tensors)):
        problems.append(f"model LoRA weight missing from the adapter file: {k}")
    for k in sorted(set(file_tensors) & set(loaded)):
        a, b = file_tensors[k].float(), loaded[k].detach().float().cpu()
        if a.shape != b.shape:
            problems.append(f"{k}: file shape {tuple(a.shape)}, model shape {tuple(b.shape)}")
        elif not torch.equal(a, b):
            problems.append(f"{k}: loaded values differ from the file (max {(a - b).abs().max().item():.3g})")
    return problems, len(file_tensors)


def main(argv):
    args = parse_args(argv)
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    from peft import PeftModel

    expected = load_file(args.expected)
    for k in ("input_ids", args.key):
        if k not in expected:
            print(f"error: {args.expected} has no tensor '{k}' (has: {', '.join(sorted(expected))})")
            return 2
    input_ids = expected["input_ids"].long()  # (B, T)
    want = expected[args.key].float()  # (B, T, V)

    base = load_model(args.model, args.attn)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False)
    model.eval()
    problems, n_keys = check_adapter_loaded(model, args.adapter)
    if problems:
        print(f"error: adapter {args.adapter} did not load cleanly:")
        for p in problems:
            print(f"  {p}")
        return 2
    print(f"adapter: {n_keys} tensors loaded, all identical to the file")

    model = model.to(device=args.device, dtype=DTYPES[args.dtype])
    with torch.no_grad():
        ids = input_ids.to(args.device)
        if args.no_adapter:
            with model.disable_adapter():
                got = model(input_ids=ids).logits
        else:
            got = model(input_ids=ids).logits
    got = got.float().cpu()  # (B, T, V)
    if got.shape != want.shape:
        print(f"error: model gives {tuple(got.shape)}, expected '{args.key}' is {tuple(want.shape)}")
        return 1
    if not torch.isfinite(want).all() or not torch.isfinite(got).all():
        print("error: non-finite values in the expected or the computed logits")
        return 1
    diff = (got - want).abs()
    max_abs = diff.max().item()
    max_rel = max_abs / max(want.abs().max().item(), 1e-30)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    adapter_note = "disabled" if args.no_adapter else "on"
    print(f"{args.key} {tuple(want.shape)} device={args.device} dtype={args.dtype} adapter={adapter_note}: "
          f"max abs err {max_abs:.3e} at {where}, max rel err {max_rel:.3e} (|d| / max|expected|), tol {tol:g}")
    if max_abs > tol:
        print("FAIL")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

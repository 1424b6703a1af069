#!/usr/bin/env python3
"""Checks `kiln export` against transformers + peft (for a machine with PyTorch, e.g. the GPU machine):
the exported Hugging Face folder, loaded with transformers, gives the logits of the base model with the
PEFT adapter loaded by peft (unmerged).

    tools/check_export_transformers.py --merged OUT_DIR --base BASE_DIR --adapter ADAPTER_DIR \
        [--ids 1,17,402,3] [--dtype float32] [--device cuda] [--rtol 1e-3]

BASE_DIR is a Hugging Face folder of the base the adapter was trained on. For a random-weight base
(`kiln finetune --config NAME --seed S`), write it first with `kiln export --config NAME --seed S
--output BASE_DIR --dtype bf16` (no --adapter, no --nf4: the plain random weights). For an NF4 base
(QLoRA) pass --bnb: transformers then quantises BASE_DIR with bitsandbytes (nf4, double quantisation)
on the GPU, as kiln's CUDA quantiser does bit for bit when the base was built in the same dtype
(finetune on a GPU builds it in bf16), and the merged export holds those dequantised weights plus
the adapter, so the two agree up to the compute dtype's rounding.

Prints the largest relative difference (max |a - b| / max |b|) over the given ids and the argmax
agreement, and exits 1 when the difference exceeds --rtol.
"""
import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", required=True, help="the folder kiln export wrote")
    ap.add_argument("--base", required=True, help="the base model folder the adapter was trained on")
    ap.add_argument("--adapter", required=True, help="the PEFT adapter folder (kiln finetune's output/adapter)")
    ap.add_argument("--ids", default="1,17,402,3,999,25,7,12", help="comma-separated token ids")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bnb", action="store_true", help="load the base in NF4 with bitsandbytes (QLoRA base)")
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ids = torch.tensor([[int(x) for x in args.ids.split(",")]], device=args.device)

    kwargs = {"torch_dtype": dtype}
    if args.bnb:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(args.base, **kwargs).to(args.device) if not args.bnb else \
        AutoModelForCausalLM.from_pretrained(args.base, device_map={"": args.device}, **kwargs)
    peft_model = PeftModel.from_pretrained(base, args.adapter).eval()
    with torch.no_grad():
        want = peft_model(ids).logits.float()
    del peft_model, base
    if args.device == "cuda":
        torch.cuda.empty_cache()
    merged = AutoModelForCausalLM.from_pretrained(args.merged, torch_dtype=dtype).to(args.device).eval()
    with torch.no_grad():
        got = merged(ids).logits.float()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"check_export_transformers: max |merged - base+adapter| / max |base+adapter| = {rel:.3e} "
          f"(rtol {args.rtol}); argmax agreement {agree:.3f} over {ids.shape[1]} positions")
    return 0 if rel <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())

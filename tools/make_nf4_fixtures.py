"""Writes tests/data/nf4/ with real bitsandbytes output (run where bnb has a GPU: bnb's CUDA kernels
made the bnb-4bit checkpoints on the hub). Usage: python tools/make_nf4_fixtures.py OUT_DIR
  blockwise.safetensors      random weights of awkward shapes/dtypes and bnb's quantize_4bit output
  tiny_llama_bnb4/           a tiny LlamaForCausalLM quantised by transformers (nf4, double quant)
  tiny_llama_reference.safetensors  the bf16 originals and bnb's dequantisation of each 4-bit linear
Also prints how often tools/nf4_reference.py (IEEE reciprocal) disagrees with bnb's CUDA bytes.
Needs torch with CUDA, transformers and bitsandbytes (BNB_CUDA_VERSION picks bnb's library, e.g. 130).
"""
import copy
import json
import os
import sys

import numpy as np
import torch

os.environ.setdefault("BNB_CUDA_VERSION", "130")
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nf4_reference as ref  # noqa: E402

CASES = [  # (shape, dtype, double_quant, full f32 dequant)
    ((37, 91), torch.float32, True, True),
    ((128, 200), torch.bfloat16, True, True),
    ((3, 1001), torch.float16, True, True),
    ((64, 64), torch.bfloat16, False, True),
    ((160, 512), torch.bfloat16, True, False),
    ((1, 65), torch.float32, True, True),
    ((5, 77), torch.float32, False, True),
]


def dequant(packed, qs, dtype):
    qs2 = copy.copy(qs)
    qs2.dtype = dtype
    return F.dequantize_4bit(packed, qs2)


def blockwise(out_dir):
    torch.manual_seed(1234)
    t = {"nf4_code": F.get_4bit_type("nf4", device="cuda").float().cpu(), "dynamic_code": F.create_dynamic_map().cpu()}
    mism = 0
    for i, (shape, dt, dq, full) in enumerate(CASES):
        w = torch.randn(shape, dtype=torch.float32) * (0.02 + 0.1 * i)
        if i == 4:
            w[0, :64] = 0  # an all-zero block
            w[7] *= 40.0    # a row of large values
        w = w.to(dt).cuda()
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        _, qs_single = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        p = f"case{i}."
        t[p + "w"] = w.cpu()
        t[p + "packed"] = packed.reshape(-1).cpu()
        t[p + "absmax"] = qs.absmax.cpu()
        t[p + "absmax_f32"] = qs_single.absmax.cpu()
        if dq:
            t[p + "nested_absmax"] = qs.state2.absmax.cpu()
            t[p + "nested_code"] = qs.state2.code.cpu()
            t[p + "offset"] = qs.offset.reshape(1).float().cpu()
        t[p + "dequant"] = dequant(packed, qs, dt).cpu()
        if full:
            t[p + "dequant_f32"] = dequant(packed, qs, torch.float32).cpu()
            t[p + "dequant_bf16"] = dequant(packed, qs, torch.bfloat16).cpu()
        r = ref.quantize_nf4(w.float().cpu().numpy(), 64, dq, t["dynamic_code"].numpy(),
                             qs.offset.item() if dq else None)
        mism += int((r["packed"] != t[p + "packed"].numpy()).sum())
        if dq:
            mism += int((r["absmax"] != t[p + "absmax"].numpy()).sum())
            print(f"case{i}: bnb offset {qs.offset.item()!r}, f64 mean of absmax "
                  f"{float(np.float32(qs_single.absmax.cpu().numpy().astype(np.float64).mean()))!r}")
    print("nf4_reference (IEEE reciprocal) vs bnb CUDA: mismatching bytes/codes:", mism)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out_dir, "blockwise.safetensors"))


def tiny_llama(out_dir):
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # larger spread than the init's 0.02 so every level is used
        for name, prm in model.named_parameters():
            prm.mul_(1.0 + (len(name) % 5))
    src = os.path.join(out_dir, "_tiny_llama_bf16")
    model.save_pretrained(src)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    qmodel = LlamaForCausalLM.from_pretrained(src, quantization_config=qcfg, dtype=torch.bfloat16,
                                              device_map="cuda")
    dst = os.path.join(out_dir, "tiny_llama_bnb4")
    qmodel.save_pretrained(dst)
    reference = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            key = name + ".weight"
            reference[key + ".original"] = originals[key].contiguous()
            reference[key + ".dequant"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).cpu().contiguous()
    save_file(reference, os.path.join(out_dir, "tiny_llama_reference.safetensors"))
    for f in os.listdir(dst):
        if f not in ("model.safetensors", "config.json"):
            os.remove(os.path.join(dst, f))
    for f in os.listdir(src):
        os.remove(os.path.join(src, f))
    os.rmdir(src)
    print("linear layers:", len(reference) // 2, json.dumps(sorted(reference)[:2]))


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    blockwise(out)
    tiny_llama(out)

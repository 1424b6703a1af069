#!/usr/bin/env python3
# Writes the Llama + LoRA parity fixtures of kiln's nn/ tests (tests/data/llama/<case>/): small random
# HF LlamaForCausalLM checkpoints, peft LoRA adapters, and reference logits / loss / LoRA gradients /
# AdamW losses computed by transformers + peft in float32 on CPU (eager attention, fixed seeds).
#
# Requirements (a venv outside the repo; PyPI only, nothing pinned):
#   python3 -m venv /work/venv-fixtures
#   /work/venv-fixtures/bin/pip install torch transformers peft safetensors
#   /work/venv-fixtures/bin/python tools/make_llama_fixtures.py [OUT_DIR]   (default tests/data/llama)
# The versions used are recorded in each case's meta.json (first written with torch 2.15.0,
# transformers 5.24.0, peft 0.21.2, safetensors 0.8.0).
#
# Each case folder holds exactly:
#   config.json, model.safetensors           LlamaForCausalLM.save_pretrained (f32; tied -> no lm_head.weight).
#                                            config.json also carries the legacy "rope_theta"/"rope_scaling"
#                                            keys next to transformers 5's "rope_parameters" (as Llama 3 hub
#                                            checkpoints spell them), so transformers 4 and 5 both read it.
#   adapter/adapter_config.json,
#   adapter/adapter_model.safetensors        peft save_pretrained (keys base_model.model....lora_A.weight)
#   reference.safetensors                    input_ids (B,T) i64, labels (B,T) i64 (HF unshifted, -100 = ignore),
#                                            logits_base (B,T,V), logits (B,T,V), loss (), grad.<adapter key>,
#                                            adamw_losses (5,) (loss before each of 5 AdamW steps on the batch)
#   meta.json                                case, B, T, lora, adamw, versions, rope-scaling effect
import json
import os
import sys

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAMW_STEPS = 5

CASES = [
    dict(name="gqa1_hd64_tied_llama3rope", seed=1001, B=2, T=24, vocab=256, hidden=128, inter=192,
         heads=2, kv_heads=2, head_dim=64, tied=True, eps=1e-5, rope_theta=500000.0,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16},
         use_rslora=False, adamw=dict(lr=5e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)),
    dict(name="gqa4_hd128_untied_rslora", seed=1002, B=2, T=32, vocab=256, hidden=64, inter=160,
         heads=4, kv_heads=1, head_dim=128, tied=False, eps=1e-5, rope_theta=10000.0,
         # wavelengths 6.3 .. 5e4 straddle high_freq_wavelen 8 and low_freq_wavelen 32: all 3 llama3 regions
         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32},
         use_rslora=True, adamw=dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)),
    dict(name="gqa8_hd64_untied_norope", seed=1003, B=2, T=20, vocab=256, hidden=128, inter=192,
         heads=8, kv_heads=1, head_dim=64, tied=False, eps=1e-5, rope_theta=10000.0, rope_scaling=None,
         use_rslora=False, adamw=dict(lr=5e-3, beta1=0.85, beta2=0.99, eps=1e-6, weight_decay=0.0)),
    dict(name="gqa2_hd64_tied_norope", seed=1004, B=2, T=28, vocab=256, hidden=128, inter=256,
         heads=4, kv_heads=2, head_dim=64, tied=True, eps=1e-6, rope_theta=10000.0, rope_scaling=None,
         use_rslora=False, adamw=dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)),
]


def rope_parameters(case, scaled=True):
    """transformers 5 rope dict: rope_type + rope_theta (+ llama3 fields when the case scales)."""
    if scaled and case["rope_scaling"] is not None:
        return dict(case["rope_scaling"], rope_theta=case["rope_theta"])
    return {"rope_type": "default", "rope_theta": case["rope_theta"]}


def make_config(case, scaled=True):
    return LlamaConfig(
        vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["inter"],
        num_hidden_layers=2, num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"],
        head_dim=case["head_dim"], hidden_act="silu", max_position_embeddings=128, rms_norm_eps=case["eps"],
        tie_word_embeddings=case["tied"], rope_parameters=rope_parameters(case, scaled),
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        attn_implementation="eager", dtype="float32")


@torch.no_grad()
def randomize_base(model, gen):
    """Every base weight non-trivial: norms 1 + 0.1*randn, projections N(0, 0.06), embeddings/head N(0, 0.1)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.06 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def randomize_lora(model, gen):
    """lora_A ~ N(0, 0.1), lora_B ~ N(0, 0.02) (B non-zero so d loss / d A is non-zero)."""
    count = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            count += 1
        elif ".lora_B." in name:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            count += 1
    assert count == 2 * 2 * len(TARGET_MODULES), count


def saved_key(param_name):
    """peft parameter name (…lora_A.default.weight) -> the key save_pretrained writes (…lora_A.weight)."""
    return param_name.replace(".default.", ".")


def hf_loss(model, input_ids, labels):
    return model(input_ids=input_ids, labels=labels).loss


def write_config(model, case, out):
    """save_pretrained's config.json plus the legacy rope_theta / rope_scaling keys."""
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = case["rope_theta"]
    cfg["rope_scaling"] = case["rope_scaling"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def sort_target_modules(path):
    """peft writes target_modules from a set (order varies with PYTHONHASHSEED): sort it so reruns match."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_case(case, root):
    out = os.path.join(root, case["name"])
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    B, T, V = case["B"], case["T"], case["vocab"]

    model = LlamaForCausalLM(make_config(case)).float().eval()
    randomize_base(model, gen)
    if case["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(out, safe_serialization=True)
    os.remove(os.path.join(out, "generation_config.json"))
    write_config(model, case, out)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    input_ids = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)  # (B, T)
    labels = input_ids.clone()  # (B, T)
    drop = torch.rand((B, T), generator=gen) < 0.2
    drop[:, 1] = False  # at least one counted target per row
    labels[drop] = -100

    with torch.no_grad():
        logits_base = model(input_ids=input_ids).logits.float()  # (B, T, V)

    rope_effect = None
    if case["rope_scaling"] is not None:
        plain = LlamaForCausalLM(make_config(case, scaled=False)).float().eval()
        plain.load_state_dict(base_state)
        with torch.no_grad():
            plain_logits = plain(input_ids=input_ids).logits.float()
        rope_effect = (plain_logits - logits_base).abs().max().item()
        assert rope_effect > 1e-3, f"rope scaling has no visible effect: {rope_effect}"

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      use_rslora=case["use_rslora"], bias="none", task_type="CAUSAL_LM")
    pmodel = get_peft_model(model, lora)
    pmodel.eval()
    randomize_lora(pmodel, gen)
    adapter_dir = os.path.join(out, "adapter")
    pmodel.save_pretrained(adapter_dir, safe_serialization=True)
    os.remove(os.path.join(adapter_dir, "README.md"))
    sort_target_modules(os.path.join(adapter_dir, "adapter_config.json"))
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))

    lora_params = {saved_key(n): p for n, p in pmodel.named_parameters() if p.requires_grad}
    assert set(lora_params) == set(adapter), (sorted(lora_params), sorted(adapter))
    assert set(get_peft_model_state_dict(pmodel)) == set(adapter)
    for k, p in lora_params.items():
        assert torch.equal(p.detach(), adapter[k]), k

    with torch.no_grad():
        logits = pmodel(input_ids=input_ids).logits.float()  # (B, T, V)
        with pmodel.disable_adapter():
            again = pmodel(input_ids=input_ids).logits.float()
    assert torch.equal(again, logits_base), "disable_adapter does not give the base logits"
    assert (logits - logits_base).abs().max().item() > 1e-3, "the adapter has no visible effect"

    pmodel.zero_grad(set_to_none=True)
    loss = hf_loss(pmodel, input_ids, labels)
    loss.backward()
    grads = {"grad." + k: p.grad.detach().clone() for k, p in lora_params.items()}
    for k, g in grads.items():
        assert g.abs().max().item() > 0, f"zero gradient {k}"

    # The same loss by hand: logits[:, :-1] against labels[:, 1:], mean over counted targets.
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    assert abs(manual.item() - loss.item()) < 1e-5, (manual.item(), loss.item())

    hp = case["adamw"]
    opt = torch.optim.AdamW(list(lora_params.values()), lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                            eps=hp["eps"], weight_decay=hp["weight_decay"], foreach=False)
    adamw_losses = []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad(set_to_none=True)
        step_loss = hf_loss(pmodel, input_ids, labels)
        adamw_losses.append(step_loss.item())
        step_loss.backward()
        opt.step()
    assert adamw_losses[0] == loss.item()
    assert adamw_losses[-1] < adamw_losses[0], adamw_losses

    reference = {
        "input_ids": input_ids, "labels": labels, "logits_base": logits_base, "logits": logits,
        "loss": loss.detach().float().reshape(()),
        "adamw_losses": torch.tensor(adamw_losses, dtype=torch.float32),  # (5,)
        **grads,
    }
    reference = {k: v.contiguous() for k, v in reference.items()}
    save_file(reference, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})

    meta = {
        "case": case["name"], "seed": case["seed"], "B": B, "T": T,
        "model": {"vocab_size": V, "hidden_size": case["hidden"], "intermediate_size": case["inter"],
                  "num_hidden_layers": 2, "num_attention_heads": case["heads"],
                  "num_key_value_heads": case["kv_heads"], "head_dim": case["head_dim"],
                  "tie_word_embeddings": case["tied"], "rms_norm_eps": case["eps"],
                  "rope_theta": case["rope_theta"], "rope_scaling": case["rope_scaling"]},
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "use_rslora": case["use_rslora"],
                 "scaling": lora.lora_alpha / (lora.r ** 0.5 if case["use_rslora"] else lora.r),
                 "target_modules": TARGET_MODULES, "dropout": 0.0},
        "adamw": dict(hp, steps=ADAMW_STEPS),
        "loss_convention": "HF ForCausalLMLoss: cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100), "
                           "mean over non-ignored targets, float32",
        "rope_scaling_logits_max_abs_diff": rope_effect,
        "loss": loss.item(), "adamw_losses": adamw_losses,
        "adapter_logits_max_abs_diff": (logits - logits_base).abs().max().item(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "safetensors": safetensors.__version__},
        "attn_implementation": "eager", "dtype": "float32", "device": "cpu",
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return out, meta


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(root):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-stable reductions across machines with different core counts
    rows = []
    for case in CASES:
        out, meta = make_case(case, root)
        sz = lambda *p: os.path.getsize(os.path.join(out, *p))  # noqa: E731
        rows.append((case["name"], f"{case['heads']}/{case['kv_heads']}x{case['head_dim']}",
                     case["hidden"], case["inter"], f"{meta['B']}x{meta['T']}",
                     sz("model.safetensors"), sz("adapter", "adapter_model.safetensors"),
                     sz("reference.safetensors"), dir_size(out), meta["rope_scaling_logits_max_abs_diff"],
                     meta["adamw_losses"]))
    hdr = ("case", "heads/kv x hd", "hidden", "inter", "BxT", "model B", "adapter B", "reference B",
           "total B", "rope diff", "adamw losses")
    print(f"{hdr[0]:<28} {hdr[1]:>13} {hdr[2]:>6} {hdr[3]:>5} {hdr[4]:>5} {hdr[5]:>9} {hdr[6]:>9} "
          f"{hdr[7]:>11} {hdr[8]:>9} {hdr[9]:>9}  {hdr[10]}")
    for r in rows:
        rope = "-" if r[9] is None else f"{r[9]:.3f}"
        print(f"{r[0]:<28} {r[1]:>13} {r[2]:>6} {r[3]:>5} {r[4]:>5} {r[5]:>9} {r[6]:>9} {r[7]:>11} {r[8]:>9} "
              f"{rope:>9}  " + " ".join(f"{x:.4f}" for x in r[10]))
    print(f"all cases: {dir_size(root)} bytes in {root}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "tests", "data", "llama"))

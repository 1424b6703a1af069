#!/usr/bin/env python3
# Trains kiln's small default tokenizer (data/default/tokenizer.json): a byte-level BPE of 3840 merges-made
# tokens plus Llama 3's 256 special tokens (4096 ids) on the default corpus (the KJV text tools/bootstrap.sh
# writes), with exactly Llama 3's pre-tokenizer and decoder, and the id fixture tests/test_dataset.cpp checks.
#
#   python3 -m venv /work/venv-data && /work/venv-data/bin/pip install tokenizers
#   /work/venv-data/bin/python tools/make_default_tokenizer.py [--llama ../shared/data/llama3.1-tokenizer]
import argparse
import json
import os
import random

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Copied verbatim from the Llama 3.1 tokenizer.json (--llama checks they still match).
LLAMA_NORMALIZER = None
LLAMA_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
LLAMA_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

N_SPECIAL = 256
VOCAB_SIZE = 4096  # base tokens + the special tokens
NAMED_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 9: "<|eot_id|>"}


def special_tokens():
    """Llama 3's 256 special tokens in Llama 3's order (named ones, the rest <|reserved_special_token_k|>)."""
    out, k = [], 0
    for i in range(N_SPECIAL):
        if i in NAMED_SPECIAL:
            out.append(NAMED_SPECIAL[i])
        else:
            out.append(f"<|reserved_special_token_{k}|>")
            k += 1
    return out


def read_documents(path):
    """The corpus as tools/bootstrap.sh writes it: one chapter per document, documents split by blank lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip("\n") for d in text.split("\n\n") if d.strip()]


def check_llama_blocks(llama_dir):
    with open(os.path.join(llama_dir, "tokenizer.json"), encoding="utf-8") as f:
        real = json.load(f)
    assert real["normalizer"] == LLAMA_NORMALIZER, "normalizer differs from Llama 3's"
    assert real["pre_tokenizer"] == LLAMA_PRE_TOKENIZER, "pre_tokenizer differs from Llama 3's"
    assert real["decoder"] == LLAMA_DECODER, "decoder differs from Llama 3's"
    names = [t["content"] for t in real["added_tokens"]]
    assert names == special_tokens(), "special tokens differ from Llama 3's"


def train(docs):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_PRE_TOKENIZER["pretokenizers"][0]["pattern"]["Regex"]),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - N_SPECIAL, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(docs, trainer=trainer)
    base = tok.get_vocab_size()
    assert base <= VOCAB_SIZE - N_SPECIAL, base
    tok.add_special_tokens(special_tokens())

    # Replace the blocks by Llama 3's JSON verbatim and add Llama 3's post-processor (bos first).
    j = json.loads(tok.to_str())
    j["normalizer"] = LLAMA_NORMALIZER
    j["pre_tokenizer"] = LLAMA_PRE_TOKENIZER
    j["decoder"] = LLAMA_DECODER
    bos_id = tok.token_to_id("<|begin_of_text|>")
    j["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos_id],
                                                      "tokens": ["<|begin_of_text|>"]}}},
        ],
    }
    return Tokenizer.from_str(json.dumps(j)), j


def tokenizer_config(tok):
    """Llama 3.1's tokenizer_config.json, ids renumbered: bos/eos and the same chat template."""
    added = {}
    for name in special_tokens():
        added[str(tok.token_to_id(name))] = {"content": name, "lstrip": False, "normalized": False,
                                             "rstrip": False, "single_word": False, "special": True}
    template = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    return {"added_tokens_decoder": added, "bos_token": "<|begin_of_text|>", "chat_template": template,
            "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def fixture_cases(docs):
    """Texts whose ids the test compares: corpus slices plus awkward hand-written strings."""
    rng = random.Random(1234)
    cases = []
    for doc in rng.sample(docs, 48):
        start = rng.randrange(0, max(1, len(doc) - 600))
        cases.append(doc[start:start + rng.randrange(50, 600)])
    cases += [
        "In the beginning God created the heaven and the earth.",
        "Genesis 1\nIn the beginning\n\n\nAnd   the earth  \t was\r\nwithout form 12345 678.9",
        "I'm sure THEY'LL say it's 'quoted' -- don't they've? Ye'd.",
        "Unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, \u0394\u03b5\u03bb\u03c4\u03b1, emoji \U0001F600 and tabs\t\tend",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there.<|eot_id|>",
        "trailing spaces   ",
        "   leading spaces and <|reserved_special_token_7|> inside",
        "",
    ]
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=os.path.join(ROOT, "third_party", "corpus", "kjv.txt"))
    ap.add_argument("--llama", default=os.path.join(ROOT, "..", "shared", "data", "llama3.1-tokenizer"),
                    help="the Llama 3.1 tokenizer folder, to check the copied blocks (skipped when absent)")
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "default"))
    ap.add_argument("--fixture", default=os.path.join(ROOT, "tests", "data", "dataset", "default_tokenizer_ids.json"))
    args = ap.parse_args()

    if os.path.isfile(os.path.join(args.llama, "tokenizer.json")):
        check_llama_blocks(args.llama)
    else:
        print(f"note: {args.llama} absent, the Llama 3 blocks are not re-checked")
    docs = read_documents(args.corpus)
    tok, j = train(docs)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok), f, ensure_ascii=False, indent=1)
        f.write("\n")

    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in fixture_cases(docs)]
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    os.makedirs(os.path.dirname(args.fixture), exist_ok=True)
    with open(args.fixture, "w", encoding="utf-8") as f:
        json.dump({"vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id("<|begin_of_text|>"),
                   "eos_id": tok.token_to_id("<|end_of_text|>"), "eot_id": tok.token_to_id("<|eot_id|>"),
                   "corpus_documents": len(docs), "corpus_tokens": n_tokens, "cases": cases},
                  f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    size = os.path.getsize(os.path.join(args.out, "tokenizer.json"))
    print(f"tokenizer.json: {size} bytes, vocab {tok.get_vocab_size()}; corpus {len(docs)} documents, "
          f"{n_tokens} tokens ({sum(map(len, docs)) / n_tokens:.2f} bytes/token); {len(cases)} fixture cases")


if __name__ == "__main__":
    main()

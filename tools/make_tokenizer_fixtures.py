#!/usr/bin/env python3
"""Writes tests/data/tokenizer/llama3_cases.json: ids from Hugging Face `tokenizers` for the Llama 3.1
tokenizer.json on hand-picked strings, plus per-document (count, FNV-1a) digests of a ~1 MB corpus that
tests/test_tokenizer.cpp regenerates from the same seed and piece list (splitmix64, see `corpus`).

Usage: pip install tokenizers; tools/make_tokenizer_fixtures.py [path/to/tokenizer.json]
(`tokenizers` takes str only, so invalid UTF-8 is tested in C++ by round trip, not against it.)
"""
import json
import os
import sys

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "..", "shared", "data", "llama3.1-tokenizer", "tokenizer.json")
OUT = os.path.join(ROOT, "tests", "data", "tokenizer", "llama3_cases.json")
M64 = (1 << 64) - 1

PIECES = [
    # English prose and contractions (with case variants the (?i:) group must catch)
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "tokenization", "is", "a",
    "surprisingly", "subtle", "problem", "of", "language", "modelling", "antidisestablishmentarianism",
    "don't", "I'm", "we'll", "they've", "she'd", "it's", "you're", "DON'T", "We'Re", "O'Neill", "'s",
    "Hello,", "world!", "e.g.", "etc.", "(parenthetical)", "\"quoted\"", "“curly”", "—", "…", "...", "?!",
    # code
    "def", "foo(x):", "    return x ** 2", "#include <vector>", "std::vector<int32_t>", "{}", "=>", "->",
    "if (a != b) { return -1; }", "for i in range(10):", "\tprint(i)", "x+=1;", "0x7fff", "__init__",
    "camelCaseName", "snake_case_name", "SCREAMING_CASE", "https://example.com/a?b=c&d=e", "a/b/c.py",
    # numbers
    "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "2024-01-01", "-17", "1e-9",
    # other scripts
    "你好世界", "東京タワー", "한국어", "こんにちは", "汉字测试", "привет", "Ελληνικά", "مرحبا", "שלום", "हिन्दी",
    "café", "naïve", "Ünïcödé", "façade", "ñandú", "ß", "İstanbul",
    # emoji (incl. ZWJ sequences and flags)
    "🙂", "😀😃😄", "👩‍💻", "🇫🇷", "👍🏽", "❤️",
    # whitespace runs
    "  ", "    ", "        ", "\t\t", "\n", "\n\n\n", "   \n  ", "\r\n", " \u00a0 ", "\u3000",
    # special tokens and look-alikes
    "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|eot_id", "<|", "|>", "<|not_special|>",
]
SEPS = [" ", " ", " ", " ", "", "\n", "\n\n", "  ", "\t", ", ", ". ", "   "]
SEED = 20240607
DOCS = 256
DOC_BYTES = 4096


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def corpus():
    """DOCS documents of >= DOC_BYTES bytes: random pieces, each followed by a random separator."""
    state = SEED
    pieces = [p.encode() for p in PIECES]
    seps = [s.encode() for s in SEPS]
    docs = []
    for _ in range(DOCS):
        doc = b""
        while len(doc) < DOC_BYTES:
            state, r = splitmix64(state)
            doc += pieces[r % len(pieces)]
            state, r = splitmix64(state)
            doc += seps[r % len(seps)]
        docs.append(doc.decode())
    return docs


def fnv1a(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for b in int(i).to_bytes(4, "little"):
            h = ((h ^ b) * 0x100000001B3) & M64
    return f"{h:016x}"


CASES = [
    "", "a", "Hello, world!", " Hello", "  leading spaces", "trailing spaces   ", "I'm sure it's fine, don't worry.",
    "HE'LL SHE'D we'VE", "123456789 12 1234.5678 3,14", "def f(x):\n    return x * 2\n\n\n",
    "x" * 300, " " * 1000, "\n" * 50, "a" + " " * 37 + "b", "\t \t \n \r\n\r\n  x", "你好，世界！这是一个测试。",
    "日本語のテキストと English mixed 123", "🙂👩‍💻🇫🇷 emoji test 👍🏽", "naïve café façade İstanbul ß",
    "<|begin_of_text|>Hello<|eot_id|>", "a<|eot_id|>b<|eot_id|><|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi",
    "<|eot_id", "<|not_a_token|>", "<|reserved_special_token_5|>x", "tab\tseparated\tvalues\n1\t2\t3",
    "https://github.com/huggingface/tokenizers?tab=readme#quick", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\u00a0\u2003\u3000 unicode spaces\u2028end", "Ǆǅǆ ﬁ ﬂ Å Å", "ⅫⅧ ½ ²³ ٣٤٥ ၁၂၃",
]
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant.  "},
        {"role": "user", "content": "\n What's 2+2? <|eot_id|>"},
        {"role": "assistant", "content": "4"},
    ],
}


def chat_text(messages, add_generation_prompt):
    # tokenizer_config.json's chat_template, rendered by hand (jinja's trim == str.strip()).
    out = ""
    for i, m in enumerate(messages):
        c = "<|start_header_id|>" + m["role"] + "<|end_header_id|>\n\n" + m["content"].strip() + "<|eot_id|>"
        out += ("<|begin_of_text|>" + c) if i == 0 else c
    if add_generation_prompt:
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    tok = Tokenizer.from_file(path)
    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        bos = tok.encode(text, add_special_tokens=True).ids
        tok.encode_special_tokens = True
        as_text = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = False
        assert bos == [128000] + ids
        cases.append({"text": text, "ids": ids, "ids_special_as_text": as_text})
    chat = dict(CHAT)
    chat["text"] = chat_text(CHAT["messages"], True)
    chat["ids"] = tok.encode(chat["text"], add_special_tokens=False).ids
    docs = corpus()
    digests = []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False).ids
        digests.append({"count": len(ids), "fnv1a": fnv1a(ids)})
    out = {
        "tokenizers_version": __import__("tokenizers").__version__,
        "cases": cases,
        "chat": chat,
        "corpus": {"seed": SEED, "docs": DOCS, "doc_bytes": DOC_BYTES, "pieces": PIECES, "seps": SEPS,
                   "digests": digests, "total_bytes": sum(len(d.encode()) for d in docs)},
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
    print(f"wrote {OUT}: {len(cases)} cases, {DOCS} corpus docs ({out['corpus']['total_bytes']} bytes), "
          f"{sum(d['count'] for d in digests)} corpus tokens")


if __name__ == "__main__":
    main()

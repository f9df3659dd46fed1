"""Compare grammar libraries for structured output: xgrammar vs llguidance.

Builds a byte-level BPE tokenizer (`tokenizers`, trained on Python sources found on
this machine) of the requested vocab size, then for a JSON schema, a regex and an
EBNF grammar measures, per library: tokenizer setup, grammar compile, and the
per-token cost of computing the next-token bitmask (and of advancing the matcher)
while replaying a valid output token by token.

    .venv/bin/python benchmarks/grammar_lib_bench.py --vocab 65536 --libs llguidance,xgrammar

The libraries are imported lazily so either may be absent (e.g. PYTHONPATH=/tmp/xg
for a throwaway xgrammar install). Prints one JSON line per (lib, grammar).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import torch

JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "email", "role", "score", "active", "tags", "address"],
    "additionalProperties": False,
}
JSON_TEXT = ('{"id": 12345, "name": "Ada Lovelace", "email": "ada.lovelace@example.com", "role": "admin", '
             '"score": 98.25, "active": true, "tags": ["math", "engines", "poetry"], '
             '"address": {"street": "12 St James Square", "city": "London", "zip": "10001"}}')

REGEX = r"[A-Z][a-z]+ [A-Z][a-z]+, [0-9]{1,4} (Main|Oak|Pine|Maple) (St|Ave|Rd)\., [A-Z][a-z]+, [A-Z]{2} [0-9]{5}, \+1-[0-9]{3}-[0-9]{3}-[0-9]{4}"
REGEX_TEXT = "Grace Hopper, 1906 Maple Ave., Arlington, VA 22201, +1-555-010-1234"

# GBNF-style EBNF: arithmetic statements (xgrammar reads it natively; llguidance
# converts GBNF to Lark).
EBNF = r'''
root ::= stmt (";" ws stmt)*
stmt ::= ident ws "=" ws expr
expr ::= term (ws ("+" | "-") ws term)*
term ::= factor (ws ("*" | "/") ws factor)*
factor ::= number | ident | "(" ws expr ws ")" | ident "(" ws args? ws ")"
args ::= expr (ws "," ws expr)*
ident ::= [a-z_] [a-z0-9_]*
number ::= [0-9]+ ("." [0-9]+)?
ws ::= [ ]?
'''
EBNF_TEXT = "total = price * (1 + tax_rate) - discount; avg = sum(a, b, c) / 3; y = max(x1, 2.5 * (x2 - 10))"

CASES = [("json_schema", JSON_TEXT), ("regex", REGEX_TEXT), ("ebnf", EBNF_TEXT)]


def build_tokenizer(vocab: int, cache_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(cache_dir, f"bpe{vocab}.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path), path
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
    files += sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "*", "**", "*.py"), recursive=True))
    texts, size = [], 0
    for f in files:
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        size += len(t)
        if size > 80_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    print(f"# trained BPE vocab={tok.get_vocab_size()} on {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    os.makedirs(cache_dir, exist_ok=True)
    tok.save(path)
    return tok, path


class LLGuidanceLib:
    name = "llguidance"

    def __init__(self, tok, path: str, vocab: int) -> None:
        import llguidance
        import llguidance.torch  # noqa: F401

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(open(path).read(), n_vocab=vocab, eos_token=1)
        self.setup_s = time.perf_counter() - t0

    def compile(self, kind: str):
        g = self.llg.grammar_from({"json_schema": "json_schema", "regex": "regex", "ebnf": "gbnf"}[kind],
                                  json.dumps(JSON_SCHEMA) if kind == "json_schema" else REGEX if kind == "regex" else EBNF)
        err = self.llg.LLMatcher.validate_grammar(g, self.tok)
        assert not err, err
        return g

    def matcher(self, compiled):
        m = self.llg.LLMatcher(self.tok, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(m, bitmask, row)

    def accept(self, m, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def is_done_ok(self, m) -> bool:
        return m.is_accepting()


class XGrammarLib:
    name = "xgrammar"

    def __init__(self, tok, path: str, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        t0 = time.perf_counter()
        v = tok.get_vocab(with_added_tokens=True)
        encoded = [""] * vocab
        for s, i in v.items():
            encoded[i] = s
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[1])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0

    def compile(self, kind: str):
        if kind == "json_schema":
            return self.compiler.compile_json_schema(json.dumps(JSON_SCHEMA), any_whitespace=True)
        if kind == "regex":
            return self.compiler.compile_regex(REGEX)
        return self.compiler.compile_grammar(EBNF)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m, token: int) -> None:
        assert m.accept_token(token)

    def is_done_ok(self, m) -> bool:
        return m.accept_token(1)


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def bench(lib, tok, vocab: int, kind: str, text: str, reps: int) -> dict:
    t0 = time.perf_counter()
    compiled = lib.compile(kind)
    compile_s = time.perf_counter() - t0
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    fills, accepts, first_fill = [], [], None
    for r in range(reps):
        m = lib.matcher(compiled)
        for i, t in enumerate(ids):
            a = time.perf_counter()
            lib.fill(m, bitmask, 0)
            b = time.perf_counter()
            assert allowed(bitmask, 0, t), f"{lib.name}/{kind}: token {i} ({tok.decode([t])!r}) masked out"
            lib.accept(m, t)
            c = time.perf_counter()
            if r == 0 and i == 0:
                first_fill = b - a
            else:
                fills.append(b - a)
            accepts.append(c - b)
        lib.fill(m, bitmask, 0)
        assert lib.is_done_ok(m), f"{lib.name}/{kind}: not accepting at the end"
    fills.sort()
    return {
        "lib": lib.name, "grammar": kind, "vocab": vocab, "tokens": len(ids), "reps": reps,
        "tokenizer_setup_ms": round(lib.setup_s * 1e3, 1), "compile_ms": round(compile_s * 1e3, 2),
        "first_mask_us": round(first_fill * 1e6, 1),
        "mask_us_mean": round(statistics.fmean(fills) * 1e6, 1), "mask_us_p50": round(fills[len(fills) // 2] * 1e6, 1),
        "mask_us_p99": round(fills[int(len(fills) * 0.99)] * 1e6, 1), "mask_us_max": round(fills[-1] * 1e6, 1),
        "accept_us_mean": round(statistics.fmean(accepts) * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--libs", default="llguidance,xgrammar")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache-dir", default="/tmp/aiosched-bpe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, path = build_tokenizer(args.vocab, args.cache_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    for name in args.libs.split(","):
        lib = {"llguidance": LLGuidanceLib, "xgrammar": XGrammarLib}[name](tok, path, vocab)
        for kind, text in CASES:
            print(json.dumps(bench(lib, tok, vocab, kind, text, args.reps)), flush=True)


if __name__ == "__main__":
    main()

"""Probes of llguidance's per-mask cost on the synthetic 128k vocab (CPU, 2026-12-04):
matchers made fresh vs deep-copied from a prototype, with and without the engine's JSON
options (`deepcopy`), and tokens picked at random among the allowed vs by a fixed random
score's argmax, as a random-weight model picks them (`argmax`).

    .venv/bin/python benchmarks/results/2026-12-04-cpu-llg/matchers.py deepcopy|argmax
"""
import json, random, sys, time

sys.path.insert(0, "benchmarks")
import numpy as np, llguidance as llg  # noqa: E401
from structured_bench import SCHEMA, synthetic_tokenizer_json

from aiosched.structured import JSON_OPTIONS

V, R, STEPS = 128256, 16, 40
WORDS = (V + 31) // 32
tok = llg.LLTokenizer(synthetic_tokenizer_json(V, V - 1), n_vocab=V, eos_token=V - 1)
score = np.random.default_rng(0).standard_normal((R, V))


def matchers(how: str) -> list:
    opts = JSON_OPTIONS if how.endswith("opts") else None
    g = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=opts) if opts else \
        llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    if how.startswith("deepcopy"):
        proto = llg.LLMatcher(tok, g, log_level=0)
        return [proto.deep_copy() for _ in range(R)]
    return [llg.LLMatcher(tok, g, log_level=0) for _ in range(R)]


def run(ms: list, pick: str) -> tuple[float, float]:
    """us per mask to fill, us per token to consume, over STEPS steps (2 warm-up)."""
    bm = np.zeros((R, WORDS), dtype=np.int32)
    ptr, nb = bm.ctypes.data, WORDS * 4
    rng, fill, cons = random.Random(0), 0.0, 0.0
    for step in range(STEPS + 2):
        t0 = time.perf_counter()
        for i, m in enumerate(ms):
            m.unsafe_compute_mask_ptr(ptr + i * nb, nb)
        t1 = time.perf_counter()
        picks = []
        for i in range(R):
            a = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V])
            picks.append(int(a[rng.randrange(len(a))]) if pick == "random" else int(a[np.argmax(score[i, a])]))
        t2 = time.perf_counter()
        for m, p in zip(ms, picks):
            m.consume_token(p)
        if step >= 2:
            fill, cons = fill + t1 - t0, cons + time.perf_counter() - t2
    return 1e6 * fill / STEPS / R, 1e6 * cons / STEPS / R


if sys.argv[1:] == ["deepcopy"]:
    for how in ("fresh", "deepcopy", "fresh-opts", "deepcopy-opts", "fresh", "deepcopy"):
        print(how, "fill %.1f us/mask, consume %.1f us/token" % run(matchers(how), "random"))
else:
    for pick in ("random", "argmax", "random", "argmax"):
        print(pick, "fill %.1f us/mask, consume %.1f us/token" % run(matchers("fresh"), pick))

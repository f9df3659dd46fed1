import json, time, sys, random
sys.path.insert(0, "benchmarks")
import numpy as np, llguidance as llg
from structured_bench import synthetic_tokenizer_json, SCHEMA
V = 128256
tok = llg.LLTokenizer(synthetic_tokenizer_json(V, V - 1), n_vocab=V, eos_token=V - 1)
R = 16; words = (V + 31) // 32
g = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
score = np.random.default_rng(0).standard_normal((R, V))
for pick in ("random", "argmax", "random", "argmax"):
    ms = [llg.LLMatcher(tok, g, log_level=0) for _ in range(R)]
    bm = np.zeros((R, words), dtype=np.int32); ptr = bm.ctypes.data; nb = words * 4
    rng = random.Random(0); fill = cons = 0.0; steps = 40; texts = [b""] * R
    for step in range(steps + 2):
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
        t3 = time.perf_counter()
        if step >= 2:
            fill += t1 - t0; cons += t3 - t2
    print(f"{pick:8s} fill {1e6*fill/steps/R:6.1f} us/mask  consume {1e6*cons/steps/R:5.1f} us/token", tok.decode_bytes([t for t in picks])[:80] if hasattr(tok, "decode_bytes") else "")

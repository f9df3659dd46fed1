import json, time, sys, random
sys.path.insert(0, "benchmarks")
import numpy as np, llguidance
from structured_bench import synthetic_tokenizer_json, SCHEMA
V = 128256
tok = llguidance.LLTokenizer(synthetic_tokenizer_json(V, V - 1), n_vocab=V, eos_token=V - 1)
g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
R = 16
nbw = (V + 31) // 32
for mode in ("seq", 1, 2, "seq", 2):
    rng = random.Random(0)
    ms = [llguidance.LLMatcher(tok, g, log_level=0) for _ in range(R)]
    bm = np.zeros((R, nbw), dtype=np.int32); nb = nbw * 4
    ex = llguidance.LLExecutor(num_threads=mode) if mode != "seq" else None
    tot = 0.0
    for step in range(60):
        t = time.perf_counter()
        if ex is None:
            for i, m in enumerate(ms): m.unsafe_compute_mask_ptr(bm[i].ctypes.data, nb)
        else:
            ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bm.ctypes.data, nb, R)
        tot += time.perf_counter() - t
        for i, m in enumerate(ms):
            a = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V])
            m.consume_token(int(a[rng.randrange(len(a))]))
    print(mode, "fill of 16 fresh masks: %.0f us per step" % (1e6 * tot / 60))
from concurrent.futures import ThreadPoolExecutor
for nthreads in (2, 1, 2):
    rng = random.Random(0)
    ms = [llguidance.LLMatcher(tok, g, log_level=0) for _ in range(R)]
    bm = np.zeros((R, nbw), dtype=np.int32); nb = nbw * 4
    pool = ThreadPoolExecutor(nthreads)
    def part(k):
        for i in range(k, R, nthreads):
            ms[i].unsafe_compute_mask_ptr(bm[i].ctypes.data, nb)
    tot = 0.0
    for step in range(60):
        t = time.perf_counter()
        list(pool.map(part, range(nthreads)))
        tot += time.perf_counter() - t
        for i, m in enumerate(ms):
            a = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V])
            m.consume_token(int(a[rng.randrange(len(a))]))
    print("python threads", nthreads, "fill of 16 fresh masks: %.0f us per step" % (1e6 * tot / 60))

import json, time, sys, random
sys.path.insert(0, "benchmarks")
import numpy as np, llguidance
from concurrent.futures import ThreadPoolExecutor
from structured_bench import synthetic_tokenizer_json, SCHEMA
V = 128256
tj = synthetic_tokenizer_json(V, V - 1)
toks = [llguidance.LLTokenizer(tj, n_vocab=V, eos_token=V - 1) for _ in range(2)]
R = 16; nbw = (V + 31) // 32
for ntok in (1, 2, 1, 2):
    g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    rng = random.Random(0)
    ms = [llguidance.LLMatcher(toks[i % ntok], g, log_level=0) for i in range(R)]
    bm = np.zeros((R, nbw), dtype=np.int32); nb = nbw * 4
    pool = ThreadPoolExecutor(2)
    def part(k):
        for i in range(k, R, 2):
            ms[i].unsafe_compute_mask_ptr(bm[i].ctypes.data, nb)
    tot = cpu = 0.0
    for step in range(60):
        t = time.perf_counter(); c = time.process_time()
        list(pool.map(part, range(2)))
        tot += time.perf_counter() - t; cpu += time.process_time() - c
        for i, m in enumerate(ms):
            a = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V])
            m.consume_token(int(a[rng.randrange(len(a))]))
    print(ntok, "tokenizer objects, 2 python threads: wall %.0f us, cpu %.0f us per step" % (1e6 * tot / 60, 1e6 * cpu / 60))

import json, time, sys, random, os
sys.path.insert(0, "benchmarks")
import numpy as np, llguidance
from structured_bench import synthetic_tokenizer_json, SCHEMA
V = 128256
tok = llguidance.LLTokenizer(synthetic_tokenizer_json(V, V - 1), n_vocab=V, eos_token=V - 1, slices=[] if "noslice" in sys.argv else None)
g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
R = 64; nbw = (V + 31) // 32
EX = llguidance.LLExecutor(num_threads=int(sys.argv[1]))
rng = random.Random(0)
ms = [llguidance.LLMatcher(tok, g, log_level=0) for _ in range(R)]
bm = np.zeros((R, nbw), dtype=np.int32); nb = nbw * 4
tot = cpu = 0.0
for step in range(60):
    t = time.perf_counter(); c = time.process_time()
    EX.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bm.ctypes.data, nb, R)
    tot += time.perf_counter() - t; cpu += time.process_time() - c
    for i, m in enumerate(ms):
        a = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V])
        m.consume_token(int(a[rng.randrange(len(a))]))
print("executor %s %s:" % (sys.argv[1], sys.argv[2:]) + " wall %.0f us, process cpu %.0f us per step" % (1e6 * tot / 60, 1e6 * cpu / 60))

import json, time, sys, random, threading
sys.path.insert(0, "benchmarks")
import numpy as np, llguidance as llg
from structured_bench import synthetic_tokenizer_json, SCHEMA
V = 128256
tok = llg.LLTokenizer(synthetic_tokenizer_json(V, V - 1), n_vocab=V, eos_token=V - 1)
R = 16; words = (V + 31) // 32
g = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
stop = threading.Event()
def spin():
    x = 0
    while not stop.is_set():
        x += 1
for mode in ("alone", "spinner", "spinner-executor", "alone-executor"):
    ms = [llg.LLMatcher(tok, g, log_level=0) for _ in range(R)]
    ex = llg.LLExecutor(num_threads=2) if "executor" in mode else None
    th = None
    if mode.startswith("spinner"):
        stop.clear(); th = threading.Thread(target=spin); th.start()
    bm = np.zeros((R, words), dtype=np.int32); ptr = bm.ctypes.data; nb = words * 4
    rng = random.Random(0); fill = 0.0; steps = 30
    for step in range(steps + 2):
        t0 = time.perf_counter()
        if ex is not None:
            ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], ptr, nb, R)
        else:
            for i, m in enumerate(ms):
                m.unsafe_compute_mask_ptr(ptr + i * nb, nb)
        t1 = time.perf_counter()
        picks = [int((a := np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:V]))[rng.randrange(len(a))]) for i in range(R)]
        for m, p in zip(ms, picks):
            m.consume_token(p)
        if step >= 2:
            fill += t1 - t0
    if th is not None:
        stop.set(); th.join()
    print(f"{mode:18s} fill {1e6*fill/steps/R:7.1f} us/mask (switch interval {sys.getswitchinterval()*1e3:.1f} ms)")

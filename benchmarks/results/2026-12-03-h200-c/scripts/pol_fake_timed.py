import asyncio, sys, collections, time
sys.path.insert(0, "benchmarks")
import spec_bench as sb
from aiosched import AsyncEngine, SamplingParams
from aiosched.config import EngineConfig
async def main():
    n = 256
    import tokenizers
    tk = tokenizers.Tokenizer.from_file('/work/main/aiosched/default_model/tokenizer.json')
    prompts = [[t % 500 for t in tk.encode(x).ids] for x in sb.code_prompts(n)]
    cfg = EngineConfig.load(dict(runner="fake", max_num_seqs=n, max_num_batched_tokens=2048, async_scheduling=True,
                                 speculative=dict(method="ngram", num_tokens=4, ngram_min=1, ngram_max=4, auto=True)))
    async with AsyncEngine(cfg) as eng:
        runner = eng._executor.runner
        ex = runner.execute
        def slow(so):
            toks = sum(sr.num_tokens for sr in so.scheduled)
            time.sleep(0.00122 + 0.0000104 * toks)
            return ex(so)
        runner.execute = slow
        pol = eng.spec_policy
        orig = pol.observe
        log = []
        def obs(tokens, seconds, prompt_work=False):
            log.append((pol._phase, pol.drafting, tokens, seconds * 1e3, prompt_work))
            orig(tokens, seconds, prompt_work)
        pol.observe = obs
        await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts])
        w = len(log)
        t = time.perf_counter()
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)) for p in prompts])
        dt = time.perf_counter() - t
        print(n, "tok/s", round(sum(len(o.token_ids) for o in outs) / dt), "warmup outputs", w, eng.stats().get("spec_auto"), {k: round(v) for k, v in pol.rates.items()}, "rounds", pol.rounds)
        agg = collections.OrderedDict()
        for ph, d, t, s, pw in log:
            k = (ph, d, pw); a = agg.setdefault(k, [0, 0, 0.0]); a[0] += 1; a[1] += t; a[2] += s
        for k, (c, t, s) in agg.items(): print(k, c, "outputs", t, "tokens", round(s, 1), "ms", round(t / s * 1e3) if s else 0, "tok/s")
        print([(ph[8:] if ph.startswith("measure") else ph[:2], int(d), t, round(s, 1), int(pw)) for ph, d, t, s, pw in log[:70]])
asyncio.run(main())

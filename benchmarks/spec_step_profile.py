"""Where a speculative step's time goes, on the host and on the device.

Runs the `code` workload of `spec_bench.py` (the embedded model, greedy) on the in-process
torch runner with speculation always on, and times each phase of the runner's step on the
host (propose, lay out, forward launch, verify launch) plus the step on the device (CUDA
events around it), for steps with drafts and for plain decode steps of the same run (a
second run without speculation gives those). `--trace` also counts the device kernels
and the torch ops launched per step (torch profiler), and the aten ops launched inside
the propose and verify phases of a speculative step (each phase is a profiler range:
the ops nested under it, views included, counted per call).

    python benchmarks/spec_step_profile.py --device cuda --requests 1 --max-tokens 128 --trace
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aiosched import AsyncEngine, SamplingParams  # noqa: E402
from aiosched.config import EngineConfig  # noqa: E402
from spec_bench import code_prompts  # noqa: E402


class PhaseTimer:
    """Wraps runner methods: host seconds per call, keyed by whether the step speculates."""

    def __init__(self, runner: Any, cuda: bool) -> None:
        import torch

        self.r, self.cuda, self.torch = runner, cuda, torch
        self.host: dict[str, list[float]] = defaultdict(list)
        self.events: list[tuple[str, Any, Any]] = []
        self.kind = "plain"
        self._wrap("_propose")
        self._wrap_obj(runner.batch, "schedule", "layout")
        self._wrap("_forward")
        self._wrap("_verify")
        self._wrap("_sample")
        step = runner._step

        def timed_step(so: Any, out: Any) -> Any:
            self.kind = "spec" if any(sr.num_draft_slots for sr in so.scheduled) else "plain"
            ev = None
            if self.cuda:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            t0 = time.perf_counter()
            res = step(so, out)
            self.host[f"{self.kind}:step"].append(time.perf_counter() - t0)
            if ev is not None:
                ev[1].record()
                self.events.append((self.kind, *ev))
            return res

        runner._step = timed_step

    def _wrap(self, name: str) -> None:
        self._wrap_obj(self.r, name, name.strip("_"))

    def _wrap_obj(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                # a profiler range per phase (free when no profiler runs): trace() counts the ops under it
                with self.torch.profiler.record_function(f"phase:{self.kind}:{label}"):
                    return fn(*a, **kw)
            finally:
                self.host[f"{self.kind}:{label}"].append(time.perf_counter() - t0)

        setattr(obj, name, timed)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in sorted(self.host.items()):
            out[f"host_ms {k}"] = round(1e3 * statistics.median(v), 3)
            out[f"calls {k}"] = len(v)
        if self.events:
            self.torch.cuda.synchronize()
            dev: dict[str, list[float]] = defaultdict(list)
            for kind, a, b in self.events:
                dev[kind].append(a.elapsed_time(b))
            for k, v in dev.items():
                out[f"device_ms {k}:step"] = round(statistics.median(v), 3)
        return out


async def run(args: argparse.Namespace, spec: bool) -> dict[str, Any]:
    sc = {"method": "ngram", "num_tokens": args.num_tokens, "ngram_min": 1, "ngram_max": 4, "auto": False} if spec else None
    cfg = EngineConfig.load({"device": args.device, "model": None, "async_scheduling": not args.sync, "speculative": sc})
    prompts = code_prompts(args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    async with AsyncEngine(cfg) as eng:
        await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts])
        runner = eng._executor.runner
        timer = PhaseTimer(runner, args.device.startswith("cuda"))
        await asyncio.gather(*[eng.generate(p, params) for p in prompts])
        rep = timer.report()
        if args.trace:
            rep.update(await trace(eng, prompts, params, args))
    rep["spec"] = spec
    return rep


async def trace(eng: AsyncEngine, prompts: list[Any], params: SamplingParams, args: argparse.Namespace) -> dict[str, Any]:
    """Kernels on the device and torch ops on the host per engine step, over one more run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # the runner launches on the executor's thread: record every thread
    exp = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    s0 = eng.stats()["steps"]
    with profile(activities=acts, experimental_config=exp) as prof:
        await asyncio.gather(*[eng.generate(p, params) for p in prompts])
    steps = max(1, eng.stats()["steps"] - s0)
    ka = prof.key_averages()
    kernels = sum(e.count for e in ka if e.device_type.name == "CUDA")
    ops = [(e.key, e.count, e.cpu_time_total) for e in ka if e.key.startswith("aten::")]
    top = sorted(ops, key=lambda x: -x[2])[:15]
    dev = sorted(((e.key, e.count, e.device_time_total) for e in ka if e.device_type.name == "CUDA"), key=lambda x: -x[2])
    return {"steps_traced": steps, "device_kernels_per_step": round(kernels / steps, 1),
            "aten_ops_per_step": round(sum(c for _, c, _ in ops) / steps, 1),
            **phase_ops(prof),
            "top_aten_ops (count/step, cpu us/step)": [(k, round(c / steps, 1), round(t / steps, 1)) for k, c, t in top],
            "device_us_per_step": round(sum(t for _, _, t in dev) / steps, 1),
            "top_kernels (count/step, device us/step)": [(k[:80], round(c / steps, 1), round(t / steps, 1)) for k, c, t in dev[:25]]}


def phase_ops(prof: Any) -> dict[str, float]:
    """Median aten ops (views included) and device kernels nested under each phase range
    (`PhaseTimer`), per call: what one propose / verify launches, whatever the forward does."""
    ops: dict[str, list[int]] = defaultdict(list)
    kernels: dict[str, list[int]] = defaultdict(list)

    def walk(ev: Any) -> tuple[int, int]:
        n, k = 0, len(getattr(ev, "kernels", []) or [])
        for ch in ev.cpu_children:
            a, b = walk(ch)
            n += a + ch.name.startswith("aten::")
            k += b
        return n, k

    for ev in prof.events():
        if ev.name.startswith("phase:"):
            n, k = walk(ev)
            ops[ev.name[6:]].append(n)
            kernels[ev.name[6:]].append(k)
    out: dict[str, float] = {}
    for name in sorted(ops):
        out[f"aten_ops_per_call {name}"] = statistics.median(ops[name])
        if any(kernels[name]):
            out[f"kernels_per_call {name}"] = statistics.median(kernels[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--spec-only", action="store_true", help="skip the run without speculation")
    args = ap.parse_args()
    for spec in (True,) if args.spec_only else (True, False):
        print(json.dumps(asyncio.run(run(args, spec))), flush=True)


if __name__ == "__main__":
    main()

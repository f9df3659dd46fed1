"""The launch thread's host work per decode step, without the model (issue 17).

On the GPU the launch thread turns each SchedulerOutput into the step's inputs before it
replays a graph: `InputBatch.schedule` (block-table deltas, the step's layout, one walk over
the scheduled requests), `InputBatch.upload` (pack the staging buffer, one copy) and the
runner's greedy check. That is Python holding the interpreter lock that the engine loop
needs too, so at batch 256 it adds to the engine's own host cost (c256 on an H100,
2026-12-08: 2.9 ms of launch per 4.2 ms graph step). Here the same calls run on the CPU
(device "cpu": the copy is a memcpy) for B requests decoding in lockstep at a 300-token
context, with a block boundary crossed every 16 steps as in a real run.

    .venv/bin/python benchmarks/launch_host_cost.py --batch 64,256
    .venv/bin/python benchmarks/launch_host_cost.py --batch 256 --profile

Prints us per step (best and median of --repeats timed windows of --steps steps each), then
the same for a prefill step with --arrivals new requests of --prompt-len tokens (their
`InputBatch.add`, the step's schedule and upload: what reaches the device for them).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput  # noqa: E402
from aiosched.sampling_params import SamplingParams  # noqa: E402
from aiosched.executors.torch.input_batch import InputBatch, ScheduledStep  # noqa: E402

BLOCK = 16


def setup(batch: int, ctx: int) -> tuple[InputBatch, list[list[int]], list[int]]:
    ib = InputBatch(max_rows=batch, row_len=4096, block_size=BLOCK, max_tokens=max(2048, batch), device=torch.device("cpu"))
    tables, lens = [], []
    sp = SamplingParams(max_tokens=2048, temperature=0.0, ignore_eos=True)
    next_block = 0
    for i in range(batch):
        nb = -(-(ctx + 1) // BLOCK)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += 10_000
        ib.add(NewRequestData(f"r{i}", list(range(ctx)), ctx, sp, i))
        st = ib.reqs[f"r{i}"]
        st.block_table.extend(tables[-1])
        st.device_blocks = len(st.block_table)
        lens.append(ctx - 1)  # computed so far: the step computes the last token and samples the next
    return ib, tables, lens


def step_output(step_id: int, batch: int, tables: list[list[int]], lens: list[int]) -> SchedulerOutput:
    scheduled = []
    for i in range(batch):
        pos = lens[i]
        new: list[int] = []
        if pos + 1 > len(tables[i]) * BLOCK:
            new = [tables[i][-1] + 1]
            tables[i].append(new[0])
        scheduled.append(ScheduledRequest(f"r{i}", 1, pos, new, True))
    return SchedulerOutput(step_id, [], scheduled, [], batch)


def launch(ib: InputBatch, so: SchedulerOutput) -> ScheduledStep:
    """What the torch runner does on the host for a step (no drafts) around its forward: the
    layout, the greedy check, the upload (a decode step's padded graph layout, else the exact
    one) and the sampled rows' bookkeeping (TorchModelRunner._sample)."""
    step = ib.schedule(so, has_spec=False)
    ib.greedy(step.samplers)
    layout = ib.padded_layout(len(step.states), True, 1) if step.decode_only else ib.exact_layout(step, 1, tiles=False)
    ib.upload(step, layout)
    for st in step.samplers:
        st.num_tokens += 1
        st.dev_exact = False
    return step


def arrivals(k: int, prompt_len: int, repeats: int) -> float:
    """Best time of k arrivals + their prefill step (add, schedule, upload), over `repeats` steps."""
    ib = InputBatch(max_rows=max(256, k), row_len=4096, block_size=BLOCK, max_tokens=max(2048, k * prompt_len), device=torch.device("cpu"))
    sp = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    nb = -(-prompt_len // BLOCK)
    best = float("inf")
    for rep in range(repeats + 1):
        news = [NewRequestData(f"a{rep}-{i}", list(range(prompt_len)), prompt_len, sp, i) for i in range(k)]
        so = SchedulerOutput(rep + 1, [], [ScheduledRequest(n.req_id, prompt_len, 0, list(range(nb)), True) for n in news], [],
                             k * prompt_len)
        t0 = time.perf_counter()
        for n in news:
            ib.add(n)
        launch(ib, so)
        t = time.perf_counter() - t0
        if rep:
            best = min(best, t)
        for n in news:
            ib.free(n.req_id)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--arrivals", type=int, default=8, help="new requests in the prefill step timed last (0: none)")
    ap.add_argument("--prompt-len", type=int, default=230)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for batch in (int(b) for b in args.batch.split(",")):
        ib, tables, lens = setup(batch, args.ctx)
        sid = 0
        per_step: list[float] = []
        prof = cProfile.Profile() if args.profile else None
        for rep in range(args.repeats + 1):  # the first window warms up
            sos = []
            for _ in range(args.steps):  # the scheduler's side, built outside the timed window
                sid += 1
                sos.append(step_output(sid, batch, tables, lens))
                for i in range(batch):
                    lens[i] += 1
            if prof is not None and rep:
                prof.enable()
            t0 = time.perf_counter()
            for so in sos:
                step = launch(ib, so)
            assert step.decode_only
            t = time.perf_counter() - t0
            if prof is not None and rep:
                prof.disable()
            if rep:
                per_step.append(t / args.steps)
        print(f"batch {batch}: {1e6 * min(per_step):.0f} us per step best, {1e6 * statistics.median(per_step):.0f} median "
              f"({args.repeats} windows of {args.steps} steps; {1e9 * min(per_step) / batch:.0f} ns per request)", flush=True)
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.arrivals:
        t = arrivals(args.arrivals, args.prompt_len, 4 * args.repeats)
        print(f"prefill step with {args.arrivals} arrivals of {args.prompt_len} tokens: {1e6 * t:.0f} us best "
              f"({1e6 * t / args.arrivals:.1f} per arrival)", flush=True)


if __name__ == "__main__":
    main()

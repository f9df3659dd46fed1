"""How much of a step the network costs on loopback: remote executor vs inproc, batch 1 and 64.

    PYTHONPATH=. .venv/bin/python benchmarks/remote_overhead.py [--steps 300] [--model TINY_CHECKPOINT_DIR]

Starts `aiosched worker` subprocesses on 127.0.0.1 (CurveZMQ with fresh keys, and
`--insecure` plaintext) and drives the executors directly with the synthetic
decode steps of `benchmarks/ipc_overhead.py`, one step in flight, so every
number is a full round trip. Runners:

- echo: no model work, so remote - inproc is the whole transport: msgpack codec,
  ZeroMQ, CurveZMQ encryption, loopback TCP, the worker's threads;
- fake: the deterministic fake model (pure Python, cost grows with the batch);
- torch: with `--model DIR` when the torch runner is installed (a real forward).

Reported per runner and batch: inproc and remote step time (p50, mean), the
network cost (remote - inproc, p50) and its share of the remote step, as medians
over rounds that measure all three back to back (the sandbox is shared).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiosched.config import EngineConfig  # noqa: E402
from aiosched.event_loop import run  # noqa: E402
from benchmarks.ipc_overhead import BLOCK, MAX_BLOCKS, inproc_echo, load_average, time_steps  # noqa: E402
from aiosched.executors import keys  # noqa: E402
from aiosched.executors.base import Executor  # noqa: E402
from aiosched.executors.inproc import InprocExecutor  # noqa: E402
from aiosched.executors.remote import RemoteExecutor  # noqa: E402

_BOOT = ("import sys; sys.path.insert(0, {root!r}); import argparse; from aiosched.executors import worker_server as ws; "
         "from aiosched.executors.worker_loop import resolve_runner_factory as r; p = argparse.ArgumentParser(); "
         "ws.add_arguments(p); sys.exit(ws.main(p.parse_args(sys.argv[1:]), r({factory!r})))")


class WorkerProc:
    def __init__(self, args: list[str], factory: str | None) -> None:
        code = _BOOT.format(root=str(ROOT), factory=factory)
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args, "--log-level", "WARNING"],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"worker did not start: {line!r}")
        self.endpoint = line.split()[4]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


ROUNDS = 5


async def step_times(make: Callable[[], Executor], batch: int, steps: int) -> dict[str, float]:
    ex = make()
    await ex.start()
    try:
        lat, _ = await time_steps(ex, batch, steps, 1, warmup=20)
    finally:
        await ex.shutdown()
    return {"p50": statistics.median(lat), "mean": statistics.fmean(lat)}


async def bench_runner(name: str, base: EngineConfig, factory: str | None, keydir: Path, batches: list[int],
                       steps: int) -> list[dict[str, Any]]:
    secure_args = ["--listen", "tcp://127.0.0.1:0", "--secret-key", str(keydir / "worker.secret"),
                   "--allow", str(keydir / "engine.public")]
    workers = {"curve": WorkerProc(secure_args, factory),
               "plain": WorkerProc(["--listen", "tcp://127.0.0.1:0", "--insecure"], factory)}
    rows = []
    try:
        for batch in batches:
            rounds = []
            for _ in range(ROUNDS):  # back to back, so a burst of load elsewhere hits all three
                one: dict[str, dict[str, float]] = {
                    "inproc": await step_times(lambda: inproc_echo(base) if name == "echo" else InprocExecutor(base), batch, steps)}
                for mode, w in workers.items():
                    cfg = base.replace(executor="remote", remote_address=w.endpoint, remote_insecure=mode == "plain",
                                       remote_server_key=str(keydir / "worker.public") if mode == "curve" else None,
                                       remote_client_key=str(keydir / "engine.secret") if mode == "curve" else None)
                    one[mode] = await step_times(lambda: RemoteExecutor(cfg), batch, steps)
                rounds.append(one)
            row: dict[str, Any] = {"runner": name, "batch": batch}
            for mode in ("inproc", "curve", "plain"):
                row[mode] = {k: statistics.median(r[mode][k] for r in rounds) for k in ("p50", "mean")}
                if mode != "inproc":
                    row[mode]["cost"] = statistics.median(r[mode]["p50"] - r["inproc"]["p50"] for r in rounds)
                    row[mode]["share"] = statistics.median((r[mode]["p50"] - r["inproc"]["p50"]) / r[mode]["p50"] for r in rounds)
            rows.append(row)
            print_row(row)
    finally:
        for w in workers.values():
            w.stop()
    return rows


def print_row(row: dict[str, Any]) -> None:
    i = row["inproc"]
    print(f"  {row['runner']:<6} B={row['batch']:<3} inproc p50 {i['p50']:8.1f} µs (mean {i['mean']:8.1f})")
    for mode in ("curve", "plain"):
        r = row[mode]
        print(f"  {'':<6} {'':<5} remote/{mode:<5} p50 {r['p50']:8.1f} µs (mean {r['mean']:8.1f})"
              f"  network cost {r['cost']:8.1f} µs = {100 * r['share']:5.1f}% of the remote step")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keydir = Path(tmp)
        keys.generate(keydir, "worker")
        keys.generate(keydir, "engine")
        base = EngineConfig(runner="fake", block_size=BLOCK, num_kv_blocks=MAX_BLOCKS * max(args.batches))
        print(f"{args.steps} steps per measurement (1 in flight); {ROUNDS} rounds of (inproc, remote/curve, "
              f"remote/plain) back to back, medians over rounds; loopback TCP; "
              f"cpus {os.cpu_count()}, load average {load_average()}")
        if "echo" in args.runners:
            await bench_runner("echo", base, "benchmarks.ipc_overhead:EchoRunner", keydir, args.batches, args.steps)
        if "fake" in args.runners:
            await bench_runner("fake", base, None, keydir, args.batches, min(args.steps, 400))
        if args.model and "torch" in args.runners:
            if importlib.util.find_spec("aiosched.executors.torch.runner") is None:
                print("  torch: executors/torch/runner.py is not available; skipped")
            else:
                import torch

                torch.set_num_threads(args.threads)
                cfg = base.replace(runner="torch", model=args.model, dtype="float32")
                await bench_runner("torch", cfg, None, keydir, args.batches, min(args.steps, 100))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--model", help="tiny checkpoint dir for the torch runner")
    parser.add_argument("--runners", nargs="+", default=["echo", "fake", "torch"], choices=["echo", "fake", "torch"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads here and in the workers (1: no OpenMP spinning on a shared box)")
    cli = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(cli.threads)  # inherited by the worker subprocesses
    run(main(cli))

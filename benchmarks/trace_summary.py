"""Where a traced window's time goes, from a torch profiler Chrome trace (`aiosched bench --profile DIR`).

    python benchmarks/trace_summary.py DIR/trace_async.json [--top 25]

Prints the device's busy time and gaps, the kernels by total device time, and the host
side: CUDA runtime calls and CPU ops by total duration (a blocking call such as
cudaStreamSynchronize or a long aten op shows up at the top there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched.bench import busy_and_gaps  # noqa: E402

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def table(title: str, rows: dict[str, list[float]], top: int, span_us: float) -> None:
    print(f"\n{title}")
    print(f"{'total ms':>9} {'share':>6} {'count':>6} {'mean us':>8}  name")
    for name, durs in sorted(rows.items(), key=lambda kv: -sum(kv[1]))[:top]:
        tot = sum(durs)
        print(f"{tot / 1e3:9.2f} {tot / span_us:6.1%} {len(durs):6d} {tot / len(durs):8.1f}  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    ev = load_events(a.trace)
    dev = [e for e in ev if e.get("cat") in DEVICE]
    if dev:
        span = device_tables(dev, a.top)
    else:
        hv = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in ev]
        span = max(e for _, e in hv) - min(s for s, _ in hv)
        print(f"no device events (CPU run); host window {span / 1e3:.2f} ms")
    host_tables(ev, a.top, span)


def device_tables(dev: list[dict[str, Any]], top: int) -> float:
    iv = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in dev)
    busy, gaps, span = busy_and_gaps(iv)
    print(f"window {span / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms ({busy / span:.1%}), {len(dev)} device events")
    for lo, hi in ((0, 20), (20, 100), (100, 1000), (1000, 10_000), (10_000, 1e12)):
        g = [x for x in gaps if lo <= x < hi]
        print(f"  gaps {lo:>6.0f}-{hi if hi < 1e12 else float('inf'):>6} us: {len(g):6d}, {sum(g) / 1e3:8.2f} ms ({sum(g) / span:.1%})")
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in dev:
        kernels[e["name"]].append(float(e.get("dur", 0)))
    table("device: kernels and copies by total time", kernels, top, span)
    return span


def host_tables(ev: list[dict[str, Any]], top: int, span: float) -> None:
    runtime: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, list[float]] = defaultdict(list)
    for e in ev:
        cat = e.get("cat")
        if cat == "cuda_runtime" or cat == "cuda_driver":
            runtime[e["name"]].append(float(e.get("dur", 0)))
        elif cat in ("cpu_op", "user_annotation", "python_function"):
            ops[e["name"]].append(float(e.get("dur", 0)))
    table("host: CUDA runtime/driver calls by total time", runtime, 12, span)
    table("host: CPU ops by total (inclusive) time", ops, top, span)


if __name__ == "__main__":
    main()

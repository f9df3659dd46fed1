"""The JAX runner on the tpu-inference benchmark workload, sync vs async scheduling in one run.

Workload and engine limits as in tpu-inference's async-scheduling benchmark
(Llama-3.2-1B; `vllm bench serve --random-input-len 230 --random-output-len 120
--num-prompts 200 --max-concurrency 3 --ignore-eos` against `--max-model-len 800
--max-num-seqs 256 --max-num-batched-tokens 512 --no-enable-prefix-caching`): random
token-id prompts of 230 tokens, 120 output tokens each, at most 3 requests in flight. Both scheduling modes run the same prompts in one process
through `AsyncEngine(runner="jax", executor="inproc")`; the report (aiosched.bench's
metrics: req/s, output tok/s, TTFT/TPOT/ITL, engine time split) adds the JAX compile
stats (programs compiled, seconds).

Weights: `--model DIR` runs an HF checkpoint; otherwise `--shape` runs random weights
drawn on the device (`load_format = "random"`, a model dir holding only config.json; no
checkpoint needed). Shapes: `cpu-small` (default on CPU), `llama-3.2-1b` (default on
GPU), `qwen3-0.6b`, or a path to a config.json.

The step programs this workload can reach (batches of up to max(concurrency, warmups)
requests of up to input+output tokens) are compiled before the timed runs
(AIOSCHED_JAX_PRECOMPILE; `--no-precompile` to compile lazily instead) and shared by
both runs, so neither mode pays compilation inside its timed window.

CPU (here):   python benchmarks/jax_bench.py --num-prompts 12
GPU:          python benchmarks/jax_bench.py --device gpu --shape llama-3.2-1b --num-prompts 200 --json out.json
              (needs jax with its CUDA plugin, plus aiosched's msgspec, anyio, tokenizers,
              numpy and torch (random_checkpoint's shape table). On the lent GPU machines
              only msgspec is missing: carry `.whl` and install it first, e.g.
              `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/msgspec*.whl;
              PYTHONPATH=/tmp/site:$PWD python3 benchmarks/jax_bench.py --device gpu ...`.
              About 1 minute of compilation on 16 cores, then ~1 minute per mode.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Small enough for a 2-core CPU run to finish in a few minutes (the other shapes come from
# aiosched.executors.torch.random_checkpoint.shape_config: llama-3.2-1b, qwen3-0.6b).
CPU_SMALL = dict(arch="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                 vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True, head_dim=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: JAX's accelerator backend (EngineConfig device 'cuda')")
    p.add_argument("--shape", default=None, help="random-weight model shape (default: cpu-small on cpu, llama-3.2-1b on gpu)")
    p.add_argument("--model", default=None, help="an HF checkpoint dir instead of random weights")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 12 on cpu, 200 on gpu")
    p.add_argument("--input-len", type=int, default=230)
    p.add_argument("--output-len", type=int, default=120)
    p.add_argument("--max-concurrency", type=int, default=3)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=800)
    p.add_argument("--prefix-caching", action="store_true", help="default off, as in the reference run")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="default: room for 4x the concurrent requests at max_model_len")
    p.add_argument("--dtype", default="auto", help="auto: float32 on cpu, bfloat16 on gpu")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--tile-size", type=int, default=None, help="query rows per attention tile (AIOSCHED_JAX_TILE, default 32)")
    p.add_argument("--scan-layers", choices=["auto", "0", "1"], default="auto",
                   help="1: layers under lax.scan (default on CPU: compiles fast), 0: unrolled (default on GPU: "
                        "no per-layer host round trip); AIOSCHED_JAX_SCAN_LAYERS")
    p.add_argument("--no-precompile", action="store_true", help="compile step programs lazily (compilation then lands in the timed runs)")
    p.add_argument("--executor", choices=["inproc", "remote"], default="inproc",
                   help="remote: the JAX runner in an `aiosched worker` subprocess on loopback (plaintext), the engine here")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def start_loopback_worker() -> tuple[subprocess.Popen, str]:
    """`aiosched worker --runner jax --insecure` on 127.0.0.1 (a free port); (process, endpoint).
    It inherits this process's environment, so the AIOSCHED_JAX_* settings apply there."""
    cmd = [sys.executable, "-m", "aiosched", "worker", "--listen", "tcp://127.0.0.1:0", "--runner", "jax", "--insecure"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the worker did not start: {line!r}")
    return proc, line.split()[4]


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    gpu = a.device == "gpu"
    num_prompts = a.num_prompts or (200 if gpu else 12)
    shape_name = shape = a.shape or ("llama-3.2-1b" if gpu else "cpu-small")
    if not a.no_precompile:
        os.environ["AIOSCHED_JAX_PRECOMPILE"] = f"reqs={max(a.max_concurrency, a.num_warmups)},len={a.input_len + a.output_len}"
    if a.scan_layers != "auto":
        os.environ["AIOSCHED_JAX_SCAN_LAYERS"] = a.scan_layers
    if a.tile_size:
        os.environ["AIOSCHED_JAX_TILE"] = str(a.tile_size)

    import jax

    from aiosched import bench
    from aiosched.executors.jax import runner as jax_runner

    num_kv_blocks = a.num_kv_blocks or 4 * a.max_concurrency * -(-a.max_model_len // a.block_size)

    with tempfile.TemporaryDirectory(prefix="jax-bench-") as tmp:
        if a.model:
            weights = ["--model", a.model]
        else:
            if shape == "cpu-small":
                from aiosched.executors.torch.random_checkpoint import hf_config

                shape = os.path.join(tmp, "cpu-small.json")
                Path(shape).write_text(json.dumps(hf_config(**CPU_SMALL)))
            weights = ["--random-weights", shape]
        worker = start_loopback_worker() if a.executor == "remote" else None
        executor = ["--executor", "inproc"] if worker is None else ["--executor", "remote", "--remote-address", worker[1], "--remote-insecure"]
        bench_argv = [
            "--disable-tqdm", "--runner", "jax", *executor, "--device", "cuda" if gpu else "cpu", *weights,
            "--dtype", a.dtype, "--num-prompts", str(num_prompts), "--input-len", str(a.input_len),
            "--output-len", str(a.output_len), "--max-concurrency", str(a.max_concurrency), "--ignore-eos",
            "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--max-num-seqs", str(a.max_num_seqs),
            "--block-size", str(a.block_size), "--num-kv-blocks", str(num_kv_blocks), "--max-model-len", str(a.max_model_len),
            "--enable-prefix-caching" if a.prefix_caching else "--no-enable-prefix-caching",
            "--num-warmups", str(a.num_warmups), "--seed", str(a.seed), "--compare", a.modes, "--label", f"jax-{a.device}-{shape_name}",
        ]
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        args = parser.parse_args(bench_argv)
        from aiosched.event_loop import run

        t0 = time.perf_counter()
        try:
            report = run(bench.run_bench(args))
        finally:
            if worker is not None:
                worker[0].terminate()
                worker[0].wait(30)
        report["wall_s"] = time.perf_counter() - t0
    report["executor"] = a.executor
    report["jax"] = {
        "version": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "shape": None if a.model else shape_name, "model": a.model, "precompile": not a.no_precompile,
        # In remote mode the programs are compiled in the worker process: not counted here.
        "compile": jax_runner.compile_stats() if worker is None else None, "scan_layers": a.scan_layers,
    }
    bench.print_report(report)
    c = report["jax"]["compile"]
    if c is None:
        print(f"\nJAX {jax.__version__}, runner in an `aiosched worker` on loopback ({worker[1]})")
    else:
        print_compile_and_runs(report, c, a.model)
    if "ratios" in report:
        r = report["ratios"]
        print(f"  {report['ratios_of']}: {r['request_throughput']:.3f}x req/s, {r['output_throughput']:.3f}x output tok/s")
    if a.json_path:
        bench.write_json(report, a.json_path)
    return report


def print_compile_and_runs(report: dict, c: dict, model: str | None) -> None:
    """Compile counts and each mode's runner execute() time (inproc: the runner is in this process)."""
    jax_info = report["jax"]
    print(f"\nJAX {jax_info['version']} on {jax_info['backend']} ({jax_info['devices'][0]}), model "
          f"{model or jax_info['shape']}: {c['programs']} programs compiled ({c['step_programs']} step, {c['write_programs']} token-write) "
          f"in {c['compile_s']:.1f}s of compile time ({c['precompile_wall_s']:.1f}s wall, precompiled on {c['precompile_threads']} threads)")
    host = {r["async_scheduling"]: r["execute_ms_per_step"] for r in c["runs"]}
    for mode, m in report["runs"].items():
        print(f"  {mode:5s}: {m['request_throughput']:.3f} req/s, {m['output_throughput']:.1f} output tok/s, "
              f"mean TPOT {m['mean_tpot_ms']:.2f} ms, mean step {m['engine']['mean_step_ms']:.2f} ms, "
              f"runner execute() {host.get(mode == 'async', float('nan')):.3f} ms/step")

if __name__ == "__main__":
    main()

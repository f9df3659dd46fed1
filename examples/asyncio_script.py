"""aiosched from plain asyncio: one request, many at once, streaming, cancellation.

Run (any HF-layout model directory, or a TOML config file):

    python examples/asyncio_script.py --model /path/to/model
    python examples/asyncio_script.py --config examples/configs/inproc.toml

The engine lives inside `async with`; `generate()` returns a handle that is both
awaitable (the final output) and an async iterator (streamed outputs). Cancelling
the consuming task aborts the request and frees its KV cache blocks at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from aiosched import AsyncEngine, EngineConfig, SamplingParams

PROMPTS = ["def fibonacci(n):", "import asyncio\n", "class Stack:", "# Sort a list in place\n"]


async def demo(config: Any = None, out: Any = sys.stdout) -> dict[str, Any]:
    """Run the demo, printing to `out`; return the results (used by tests/test_examples.py)."""
    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    results: dict[str, Any] = {}
    async with AsyncEngine.from_config(config) as engine:
        # 1. One request: await the handle.
        first = await engine.generate(PROMPTS[0], greedy)
        print(f"--- one request ({first.finish_reason}):\n{PROMPTS[0]}{first.text}", file=out)
        results["one"] = first.text

        # 2. Many at once: the engine batches them continuously.
        many = await asyncio.gather(*(engine.generate(p, greedy) for p in PROMPTS))
        results["many"] = [o.text for o in many]
        print(f"--- {len(many)} concurrent requests, {sum(len(o.token_ids) for o in many)} tokens", file=out)

        # 3. Streaming: deltas as they are generated.
        print("--- streaming:", file=out)
        streamed = ""
        async for chunk in engine.generate(PROMPTS[1], greedy):
            streamed += chunk.new_text
            print(chunk.new_text, end="", flush=True, file=out)
        print(file=out)
        results["streamed"] = streamed

        # 4. Cancellation (a client that went away, asyncio.timeout, TaskGroup failure...)
        #    aborts the request and frees its KV blocks at once.
        started = asyncio.Event()

        async def long_job() -> None:
            params = SamplingParams(max_tokens=engine.info.max_model_len // 2, ignore_eos=True)
            async for _ in engine.generate(PROMPTS[2], params):
                started.set()

        task = asyncio.create_task(long_job())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        results["cancelled"] = task.cancelled()
        await asyncio.sleep(0)  # let the abort reach the scheduler
        stats = engine.stats()
        print(f"--- after cancelling: running={stats['num_running']} waiting={stats['num_waiting']} "
              f"free KV blocks={stats['kv_free_blocks']}/{stats['kv_num_blocks']}", file=out)
        results["stats"] = stats
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF-layout model directory")
    parser.add_argument("--config", help="TOML engine config (model, executor, device, ...)")
    args = parser.parse_args(argv)
    config = EngineConfig.load(args.config, **({"model": args.model} if args.model else {}))
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(demo(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""executor = "ray": every rank a Ray actor, on a local Ray instance with 2 CPUs.

Parity with inproc (greedy tokens, sync and async, TP 1 and 2), a real TP=2
forward over gloo with the rendezvous through Ray, the engine inside a Ray task, a
killed actor failing the pending requests fast, and no actor left behind after
`shutdown()` or after the driver process dies. Start-up times are printed
(`-s` shows them) and recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.config import EngineConfig
from aiosched.errors import EngineDeadError
from aiosched.executors.fake_runner import reference_tokens
from procs import wait_gone
from ray_cluster import free_cpus, local_ray

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
FAKE = dict(runner="fake", num_kv_blocks=48, block_size=4, max_num_batched_tokens=32)
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ray():
    return local_ray()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return [[(i * 7 + j * 13 + seed) % 500 for j in range(3 + (i * 5) % 19)] for i in range(n)]


async def run_all(eng: AsyncEngine, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = await asyncio.gather(*[eng.generate(p, params) for p in ps])
    return [o.token_ids for o in outs]


def _report(what: str, seconds: float | None) -> None:
    print(f"\n[ray start-up] {what}: {seconds:.2f}s", flush=True)


@pytest.mark.parametrize("tp,async_scheduling", [(1, False), (1, True), (2, False), (2, True)])
async def test_fake_runner_matches_inproc(ray, make_engine, tp: int, async_scheduling: bool) -> None:
    ps = prompts(12)
    async with make_engine(**FAKE, executor="inproc", async_scheduling=async_scheduling) as eng:
        expected = await run_all(eng, ps)
    async with make_engine(**FAKE, executor="ray", tensor_parallel_size=tp, async_scheduling=async_scheduling) as eng:
        ex = eng._executor
        _report(f"fake runner, TP={tp}", ex.startup_s)
        assert len(ex.actors) == tp and len(ex.worker_pids) == tp
        assert ex.max_concurrent_batches == (2 if async_scheduling else 1)
        assert await run_all(eng, ps) == expected
        assert eng.stats()["preemptions"] > 0, "the small pool must force preemption"
        pids = ex.worker_pids
    assert wait_gone(pids, 10.0) == [], "actors left behind after shutdown()"
    assert free_cpus(ray) == 2.0, "the placement group was not removed"
    assert expected[0] == reference_tokens(ps[0], GREEDY.max_tokens)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ray-llama"), arch="llama", seed=5)


async def test_torch_tp2_over_gloo_matches_inproc(ray, make_engine, tiny_model: Path) -> None:
    """A real sharded forward: two actors, torch.distributed (gloo) joined at the address rank 0 gave through Ray."""
    cfg = dict(runner="torch", model=str(tiny_model), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
               max_num_batched_tokens=64, max_model_len=256, cpu_threads=1)
    ps = prompts(4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    async with make_engine(**cfg, executor="inproc") as eng:
        expected = await run_all(eng, ps, params)
    async with make_engine(**cfg, executor="ray", tensor_parallel_size=2) as eng:
        _report("torch runner (tiny llama), TP=2, gloo", eng._executor.startup_s)
        assert await run_all(eng, ps, params) == expected


def _generate_in_a_task() -> list[list[int]]:
    async def main() -> list[list[int]]:
        async with AsyncEngine(EngineConfig(**FAKE, executor="ray")) as eng:
            return await run_all(eng, prompts(3))
    return asyncio.run(main())


def test_engine_inside_a_ray_task(ray) -> None:
    """The same engine from inside a Ray task: the actors join the cluster the task runs in."""
    # The tests folder is not on the workers' path: ship this module's code by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(num_cpus=0)(_generate_in_a_task)
    assert ray.get(task.remote(), timeout=120) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(3)]
    assert free_cpus(ray) == 2.0


def _long() -> SamplingParams:
    return SamplingParams(max_tokens=3000, temperature=0.0)


async def _await(stream):
    return await stream


async def test_killed_actor_fails_pending_requests_fast(ray, make_engine) -> None:
    eng = make_engine(executor="ray", runner="fake", tensor_parallel_size=2, num_kv_blocks=1024, block_size=16)
    await eng.start()
    pids = eng._executor.worker_pids
    streams = [eng.generate(p, _long()) for p in prompts(3)]
    await asyncio.sleep(0.3)  # mid-generation
    assert not eng.is_dead
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    for s in streams:
        with pytest.raises(EngineDeadError, match=r"rank 1 \(Ray actor, pid \d+\) died"):
            await asyncio.wait_for(_await(s), 5.0)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(EngineDeadError):
        eng.generate([1, 2, 3], GREEDY)
    await eng.shutdown()
    assert wait_gone(pids, 10.0) == [], "the surviving rank was left behind"
    assert free_cpus(ray) == 2.0


_DRIVER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    import ray
    from aiosched import AsyncEngine, SamplingParams

    async def main():
        eng = AsyncEngine.from_config(executor="ray", runner="fake", num_kv_blocks=256, block_size=16)
        await eng.start()
        await eng.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        print("PIDS", *eng._executor.worker_pids, flush=True)
        stream = eng.generate([4, 5, 6], SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True))
        async for _ in stream:
            await asyncio.sleep(0.01)

    if __name__ == "__main__":
        ray.init(address={address!r}, log_to_driver=False)
        asyncio.run(main())
""")


def test_no_actor_outlives_its_driver(ray, tmp_path: Path) -> None:
    """A driver SIGKILLed mid-generation: Ray reaps the actors it owned and frees their placement group."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(root=str(ROOT), address=ray.get_runtime_context().gcs_address))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line + (proc.stderr.read() if proc.stderr else "")
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == 1 and wait_gone(pids, 0.5) == pids
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, 30.0) == [], "actors outlived their driver"
        assert free_cpus(ray, timeout=30.0) == 2.0
    finally:
        proc.kill()
        proc.wait()


def test_placement_and_address_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="ray_placement must be 'pack' or 'spread'"):
        EngineConfig(executor="ray", ray_placement="everywhere")
    cfg = EngineConfig(executor="ray", ray_placement="spread", ray_address="auto")
    assert (cfg.ray_placement, cfg.ray_address) == ("spread", "auto")

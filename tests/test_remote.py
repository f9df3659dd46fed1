"""Remote executor and `aiosched worker` over 127.0.0.1: parity, CurveZMQ auth, failures, key files.

The worker runs as a real subprocess (`python -m aiosched worker ...`).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from aiosched import SamplingParams
from aiosched.errors import EngineDeadError
from aiosched.protocol import PROTOCOL_VERSION, Heartbeat, Hello, Ready, WorkerError, decode_from_worker, encode
from aiosched.config import EngineConfig
from aiosched.executors import keys
from aiosched.executors.fake_runner import FakeModelRunner, reference_tokens
from procs import wait_gone

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
FAKE = dict(runner="fake", num_kv_blocks=48, block_size=4, max_num_batched_tokens=32)
pytestmark = pytest.mark.timeout(120)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return [[(i * 7 + j * 13 + seed) % 500 for j in range(3 + (i * 5) % 19)] for i in range(n)]


async def run_all(eng, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in await asyncio.gather(*[eng.generate(p, params) for p in ps])]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("worker", "engine", "intruder"):
        keys.generate(d, name)
    return d


class Worker:
    """`aiosched worker` as a subprocess; `endpoint` is where it listens."""

    def __init__(self, args: list[str], log_path: Path, command: list[str] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        self.log_path = log_path
        self._log = open(log_path, "ab")
        command = command or [sys.executable, "-m", "aiosched", "worker"]
        self.proc = subprocess.Popen([*command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(10)
            raise AssertionError(f"worker did not start: {line!r}\n{log_path.read_text()}")
        self.endpoint = line.split()[4]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(10)
        self._log.close()
        return code


def secure_args(keydir: Path, listen: str = "tcp://127.0.0.1:0", runner: str = "fake") -> list[str]:
    return ["--listen", listen, "--runner", runner, "--secret-key", str(keydir / "worker.secret"),
            "--allow", str(keydir / "engine.public")]


@pytest.fixture
def worker(keydir: Path, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(secure_args(keydir), tmp_path / "worker.log")
    yield w
    assert w.stop() == 0, w.log_path.read_text()


def client(keydir: Path, endpoint: str, name: str = "engine", **kw: object) -> dict:
    return dict(executor="remote", remote_address=endpoint, remote_server_key=str(keydir / "worker.public"),
                remote_client_key=str(keydir / f"{name}.secret"), **kw)


# ---- parity ----


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_remote_matches_inproc(make_engine, keydir: Path, worker: Worker, async_scheduling: bool) -> None:
    ps = prompts(24)
    async with make_engine(**FAKE, async_scheduling=async_scheduling) as eng:
        expected = await run_all(eng, ps)
    async with make_engine(**FAKE, **client(keydir, worker.endpoint), async_scheduling=async_scheduling) as eng:
        assert await run_all(eng, ps) == expected
        assert eng.stats()["preemptions"] > 0
    assert expected[0] == reference_tokens(ps[0], GREEDY.max_tokens)


async def test_sessions_one_after_another(make_engine, keydir: Path, worker: Worker) -> None:
    for _ in range(3):
        async with make_engine(**FAKE, **client(keydir, worker.endpoint)) as eng:
            assert await run_all(eng, prompts(3)) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(3)]


async def test_second_engine_is_refused_while_busy_then_served(make_engine, keydir: Path, worker: Worker) -> None:
    async with make_engine(**FAKE, **client(keydir, worker.endpoint)) as first:
        second = make_engine(**FAKE, **client(keydir, worker.endpoint))
        with pytest.raises(EngineDeadError, match="busy"):
            await second.start()
        await second.shutdown()
        assert await run_all(first, prompts(2)) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(2)]
    async with make_engine(**FAKE, **client(keydir, worker.endpoint)) as third:
        await run_all(third, prompts(2))


async def test_torch_runner_remote_matches_inproc(make_engine, keydir: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("aiosched.executors.torch.runner") is None:
        pytest.skip("executors/torch/runner.py is not there yet")
    random_checkpoint = pytest.importorskip("aiosched.executors.torch.random_checkpoint")
    model = tmp_path / "tiny-llama"
    random_checkpoint.write_random_checkpoint(model, arch="llama", seed=5)
    cfg = dict(runner="torch", model=str(model), device="cpu", dtype="float32", num_kv_blocks=48, block_size=4,
               max_num_batched_tokens=64, max_model_len=256)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ps = prompts(6)
    async with make_engine(**cfg) as eng:
        expected = await run_all(eng, ps, params)
    # the worker pins its own model dir and runner; the engine's are overridden
    w = Worker(secure_args(keydir, runner="torch") + ["--model", str(model), "--device", "cpu"], tmp_path / "w.log")
    try:
        for async_scheduling in (False, True):
            remote = dict(cfg, runner="fake", model=str(model), async_scheduling=async_scheduling)
            async with make_engine(**remote, **client(keydir, w.endpoint)) as eng:
                assert eng.info.runner == "torch"
                assert await run_all(eng, ps, params) == expected
    finally:
        assert w.stop() == 0


# ---- authentication ----


async def _refused(make_engine, cfg: dict, match: str) -> None:
    eng = make_engine(**FAKE, **cfg)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=match):
        await eng.start()
    assert time.monotonic() - t0 < 5.0
    await eng.shutdown()


async def test_wrong_and_missing_keys_are_refused_and_worker_keeps_serving(make_engine, keydir: Path, worker: Worker) -> None:
    await _refused(make_engine, client(keydir, worker.endpoint, name="intruder"), "refused our key")
    await _refused(make_engine, dict(executor="remote", remote_address=worker.endpoint, remote_insecure=True), "requires CurveZMQ keys")
    wrong_server = client(keydir, worker.endpoint) | {"remote_server_key": str(keydir / "intruder.public")}
    await _refused(make_engine, wrong_server, "remote_server_key is probably not")
    assert worker.alive
    async with make_engine(**FAKE, **client(keydir, worker.endpoint)) as eng:
        assert await run_all(eng, prompts(2)) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(2)]
    assert "refused a client" in worker.log_path.read_text()


def _raw_client(keydir: Path, endpoint: str, name: str | None) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    if name is not None:
        sock.curve_serverkey = keys.load_public_key(keydir / "worker.public")
        sock.curve_publickey, sock.curve_secretkey = keys.load_secret_key(keydir / f"{name}.secret")
    sock.connect(endpoint)
    return ctx, sock


def test_unauthenticated_garbage_gets_nothing_and_bad_frames_are_answered(keydir: Path, worker: Worker) -> None:
    # a client with a refused key: its frames never reach the worker's loop
    ctx, sock = _raw_client(keydir, worker.endpoint, "intruder")
    sock.rcvtimeo = 500
    for frame in (b"\xffgarbage", encode(Heartbeat(1)), b"x" * 100_000):
        sock.send(frame, zmq.NOBLOCK)
    with pytest.raises(zmq.Again):
        sock.recv()
    sock.close(0)
    ctx.term()
    # a plaintext client sending raw bytes to the Curve port: nothing either
    import socket as pysock
    host, port = worker.endpoint[len("tcp://"):].rsplit(":", 1)
    with pysock.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n" + os.urandom(4096))
        raw.settimeout(1.0)
        try:
            raw.recv(4096)
        except (TimeoutError, ConnectionResetError, OSError):
            pass
    # an authenticated client sending bad frames gets WorkerError(fatal=False), then service
    ctx, sock = _raw_client(keydir, worker.endpoint, "engine")
    try:
        for frames in ([b""], [b"\x92\x01"], [encode(Heartbeat(3))[:-1]], [b"a", b"b"], [encode({"type": "Execute", "output": 5})]):
            sock.send_multipart(frames)
            err = decode_from_worker(sock.recv())
            assert isinstance(err, WorkerError) and not err.fatal, err
        sock.send(encode(Heartbeat(9)))
        assert decode_from_worker(sock.recv()) == Heartbeat(9)
        sock.send(encode(Hello(PROTOCOL_VERSION + 1, EngineConfig(runner="fake"))))
        err = decode_from_worker(sock.recv())
        assert isinstance(err, WorkerError) and err.fatal and "protocol version" in err.message
        sock.send(encode(Hello(PROTOCOL_VERSION, EngineConfig(runner="fake", num_kv_blocks=8))))
        while not isinstance(msg := decode_from_worker(sock.recv()), Ready):
            assert isinstance(msg, Heartbeat)
        sock.send(b"\x00garbage")  # inside a session, too
        while not isinstance(msg := decode_from_worker(sock.recv()), WorkerError):
            assert isinstance(msg, Heartbeat)
        assert not msg.fatal
    finally:
        sock.close(0)  # vanish without Shutdown: the worker must notice and free the session
        ctx.term()
    assert worker.alive


async def test_abandoned_session_is_freed(make_engine, keydir: Path, worker: Worker, tmp_path: Path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(
        "import asyncio, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from aiosched import AsyncEngine, SamplingParams\n"
        "async def main():\n"
        f"    eng = AsyncEngine.from_config({client(keydir, worker.endpoint, **FAKE)!r})\n"
        "    await eng.start()\n"
        "    print('STARTED', flush=True)\n"
        "    await eng.generate([1, 2, 3], SamplingParams(max_tokens=4000, temperature=0))\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("STARTED")
    proc.kill()
    proc.wait()
    async with make_engine(**FAKE, **client(keydir, worker.endpoint)) as eng:  # no "busy": the dead client is noticed
        await run_all(eng, prompts(2))


# ---- worker failure ----


async def test_killed_worker_fails_pending_fast_then_restart_works(make_engine, keydir: Path, tmp_path: Path) -> None:
    w = Worker(secure_args(keydir), tmp_path / "w1.log")
    endpoint = w.endpoint
    eng = make_engine(**client(keydir, endpoint), runner="fake", num_kv_blocks=1024, block_size=16)
    await eng.start()
    streams = [eng.generate(p, SamplingParams(max_tokens=3000, temperature=0)) for p in prompts(3)]
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    w.proc.kill()
    for s in streams:
        with pytest.raises(EngineDeadError, match="lost"):
            await asyncio.wait_for(_await(s), 5.0)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(EngineDeadError):
        eng.generate([1], GREEDY)
    await eng.shutdown()
    w.stop()
    w2 = Worker(secure_args(keydir, listen=endpoint), tmp_path / "w2.log")  # same port
    try:
        async with make_engine(**FAKE, **client(keydir, endpoint)) as eng2:
            assert await run_all(eng2, prompts(2)) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(2)]
    finally:
        assert w2.stop() == 0


async def test_hung_worker_is_detected(make_engine, keydir: Path, tmp_path: Path) -> None:
    w = Worker(secure_args(keydir), tmp_path / "w.log")
    eng = make_engine(**client(keydir, w.endpoint), runner="fake", num_kv_blocks=1024, block_size=16, worker_timeout_s=1.0)
    try:
        await eng.start()
        stream = eng.generate([1, 2, 3], SamplingParams(max_tokens=3000, temperature=0))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(EngineDeadError, match="sent nothing"):
            await asyncio.wait_for(_await(stream), 5.0)
        assert time.monotonic() - t0 < 2.5
    finally:
        await eng.shutdown()
        w.proc.send_signal(signal.SIGCONT)
        w.stop()


async def _await(stream):
    return await stream


class HangingRunner(FakeModelRunner):
    """Never finishes a step that computes anything (a wedged device, say)."""

    def execute(self, so):  # type: ignore[override]
        if so.scheduled:
            threading.Event().wait()
        return super().execute(so)


_HANGING_WORKER = [sys.executable, "-c",
                   "import sys, argparse; import aiosched.executors.worker_loop as wl; wl.JOIN_TIMEOUT_S = 0.5; "
                   "from aiosched.executors import worker_server as ws; p = argparse.ArgumentParser(); ws.add_arguments(p); "
                   "sys.exit(ws.main(p.parse_args(sys.argv[1:]), wl.resolve_runner_factory('test_remote:HangingRunner')))"]


async def test_stuck_runner_frees_the_session_and_the_worker_still_exits(make_engine, keydir: Path, tmp_path: Path) -> None:
    w = Worker(secure_args(keydir), tmp_path / "w.log", command=_HANGING_WORKER)
    try:
        eng = make_engine(**client(keydir, w.endpoint), runner="fake", num_kv_blocks=64, block_size=16)
        await eng.start()
        stream = eng.generate([1, 2, 3], GREEDY)
        await asyncio.sleep(0.5)
        await eng.shutdown()  # the worker cannot stop the stuck thread: it gives up on it after JOIN_TIMEOUT_S
        with pytest.raises(EngineDeadError, match="shut down"):
            await stream
        eng2 = make_engine(**client(keydir, w.endpoint), runner="fake", num_kv_blocks=64, block_size=16)
        await eng2.start()  # a new session, with a new runner
        await eng2.shutdown()
    finally:
        t0 = time.monotonic()
        assert w.stop() == 0
        assert time.monotonic() - t0 < 5.0
    assert "busy threads" in w.log_path.read_text()


async def test_no_address_or_keys_is_a_config_error(make_engine, keydir: Path) -> None:
    with pytest.raises(ValueError, match="remote_address"):
        make_engine(executor="remote")
    eng = make_engine(executor="remote", remote_address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="remote_server_key"):
        await eng.start()


# ---- insecure mode ----


async def test_insecure_loopback_worker(make_engine, tmp_path: Path) -> None:
    w = Worker(["--listen", "tcp://127.0.0.1:0", "--runner", "fake", "--insecure"], tmp_path / "w.log")
    try:
        async with make_engine(**FAKE, executor="remote", remote_address=w.endpoint, remote_insecure=True) as eng:
            assert await run_all(eng, prompts(2)) == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(2)]
    finally:
        assert w.stop() == 0


@pytest.mark.parametrize("args,match", [
    (["--insecure", "--listen", "tcp://0.0.0.0:0"], "loopback only"),
    (["--insecure", "--listen", "tcp://*:0"], "loopback only"),
    (["--listen", "tcp://127.0.0.1:0"], "--secret-key"),
    (["--insecure-any-host", "--listen", "tcp://127.0.0.1:0"], "only makes sense with --insecure"),
    (["--insecure", "--listen", "udp://127.0.0.1:5"], "tcp://HOST:PORT"),
])
def test_worker_cli_refuses_unsafe_or_incomplete_setups(args: list[str], match: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "aiosched", "worker", "--runner", "fake", *args], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and match in res.stderr, res.stderr


def test_insecure_any_host_binds_when_asked(tmp_path: Path) -> None:
    w = Worker(["--listen", "tcp://0.0.0.0:0", "--runner", "fake", "--insecure", "--insecure-any-host"], tmp_path / "w.log")
    assert w.endpoint.startswith("tcp://0.0.0.0:")
    assert w.stop() == 0


# ---- key files ----


def test_keygen_cli_writes_a_private_secret_file(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "aiosched", "keygen", "--out", str(tmp_path / "k"), "--name", "me"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pub, sec = tmp_path / "k" / "me.public", tmp_path / "k" / "me.secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    public, secret = keys.load_secret_key(sec)
    assert keys.load_public_key(pub) == public and zmq.curve_public(secret) == public
    assert "secret-key" not in pub.read_text()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "already exists" in res.stderr
    res = subprocess.run(cmd + ["--force"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and keys.load_secret_key(sec)[0] != public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_secret_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    _, sec = keys.generate(tmp_path, "k")
    os.chmod(sec, mode)
    with pytest.raises(ValueError, match="chmod 600"):
        keys.load_secret_key(sec)
    os.chmod(sec, 0o400)
    keys.load_secret_key(sec)


async def test_engine_and_worker_refuse_an_exposed_secret_key(make_engine, keydir: Path, tmp_path: Path) -> None:
    exposed = tmp_path / "exposed.secret"
    exposed.write_text((keydir / "engine.secret").read_text())
    os.chmod(exposed, 0o644)
    eng = make_engine(executor="remote", remote_address="tcp://127.0.0.1:1", remote_server_key=str(keydir / "worker.public"),
                      remote_client_key=str(exposed))
    with pytest.raises(ValueError, match="mode 0644"):
        await eng.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "aiosched", "worker", "--runner", "fake", "--listen", "tcp://127.0.0.1:0",
                          "--secret-key", str(exposed), "--allow", str(keydir / "engine.public")],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "chmod 600" in res.stderr


def test_malformed_key_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.public"
    bad.write_text("public-key: tooshort\n")
    with pytest.raises(ValueError, match="40-character"):
        keys.load_public_key(bad)
    bad.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no 'public-key:' line"):
        keys.load_public_key(bad)
    pub1, sec1 = keys.generate(tmp_path, "a")
    pub2, _ = keys.generate(tmp_path, "b")
    mixed = tmp_path / "mixed.secret"
    lines = sec1.read_text().splitlines()
    lines[1] = pub2.read_text().splitlines()[1]
    fd = os.open(mixed, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, ("\n".join(lines) + "\n").encode())
    os.close(fd)
    with pytest.raises(ValueError, match="does not belong"):
        keys.load_secret_key(mixed)
    with pytest.raises(ValueError, match="cannot read"):
        keys.load_public_key(tmp_path / "missing.public")

"""Remote executor: the model runs in an `aiosched worker` on another host.

A ZeroMQ DEALER socket (driven by `zmq.asyncio` on the engine's loop) connects to
`config.remote_address`. By default it is a CurveZMQ client: `remote_server_key`
is the worker's public key file, `remote_client_key` our secret key file (see
`aiosched.executors.keys`; its public half must be in the worker's `--allow` list).
`remote_insecure = true` uses plaintext, for a worker started with `--insecure`.

Handshake, step futures and heartbeats are shared with the multiprocess executor
(`aiosched.executors.zmq_executor`): probe with a Heartbeat until the worker answers
(`connect_timeout_s`), `Hello` with our config, wait for `Ready`.

Failure: a socket monitor reports the transport's events at once:
- the worker refusing our key (ZAP) or a security mismatch (Curve vs plaintext)
  -> a clear error from `start()`;
- the established connection dropping (worker killed, host gone) -> dead: every
  pending step fails with `EngineDeadError`.
A silent worker (hung, or a network that drops packets without closing the
connection) is caught by the heartbeat timeout (`worker_timeout_s`). There is no
reconnection: the worker holds per-request state, so a lost connection ends the
session; a new engine can connect to the (restarted) worker.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from aiosched.config import EngineConfig
from aiosched.executors.inproc import run_in_thread
from aiosched.executors.keys import load_public_key, load_secret_key
from aiosched.executors.zmq_executor import ZmqExecutor

log = logging.getLogger("aiosched.executor")

_SHUTDOWN_LINGER_MS = 200  # let the Shutdown message reach the worker before the socket closes


def client_keys(config: EngineConfig) -> tuple[bytes, bytes, bytes] | None:
    """(server public, our public, our secret) Z85 keys, or None when insecure."""
    if config.remote_insecure:
        return None
    if not config.remote_server_key or not config.remote_client_key:
        raise ValueError("remote executor: set remote_server_key (the worker's public key file) and "
                         "remote_client_key (our secret key file), or remote_insecure = true")
    server = load_public_key(config.remote_server_key)
    public, secret = load_secret_key(config.remote_client_key)
    return server, public, secret


class RemoteExecutor(ZmqExecutor):
    connect_timeout_s = 10.0
    probe_before_heard = True
    connect_hint = ": is the worker running and reachable at that address?"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if not config.remote_address:
            raise ValueError("remote_address is required when executor = 'remote'")
        self.address = config.remote_address
        self._keys = client_keys(config)  # ValueError now, not at start: bad key files are config errors
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._connected = False  # a handshake succeeded
        self._lost = False  # ...and that connection dropped since
        self._failed_handshakes = 0  # the worker hung up mid-handshake (wrong server key?)

    def _config_for_workers(self) -> EngineConfig:
        """Our key file paths are no business of the worker."""
        return self.config.replace(remote_server_key=None, remote_client_key=None)

    @property
    def peer_names(self) -> list[str]:
        return [f"at {self.address}"]

    async def _open(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0
        sock.heartbeat_ivl, sock.heartbeat_timeout = 2000, 10000
        if self._keys is not None:
            server, public, secret = self._keys
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._sock = sock
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(self._monitor_loop(), name="aiosched-zmq-monitor"))

    async def _monitor_loop(self) -> None:
        assert self._monitor is not None
        while self._dead is None:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            self._on_event(event["event"], event["value"])

    def _on_event(self, event: int, value: int) -> None:
        secure = self._keys is not None
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected = True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._die(f"the worker {self.peer_names[0]} refused our key (CurveZMQ authentication failed, "
                      f"status {value}): add our public key to the worker's --allow list")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            hint = ("is it running with --insecure?" if secure else "it requires CurveZMQ keys (remote_server_key, remote_client_key)")
            self._die(f"security handshake with the worker {self.peer_names[0]} failed: {hint}")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self._connected:
            self._failed_handshakes += 1
            if self._failed_handshakes >= 3:
                hint = ("remote_server_key is probably not this worker's public key" if secure
                        else "it probably requires CurveZMQ keys")
                self._die(f"the worker {self.peer_names[0]} hung up during the handshake "
                          f"{self._failed_handshakes} times: {hint}")
        elif event == zmq.EVENT_DISCONNECTED and self._connected:
            self._lost = True
            if not self._closing:
                self._die(f"connection to the worker {self.peer_names[0]} was lost")

    def _send(self, peer: int, frame: bytes) -> None:
        assert self._sock is not None
        fut = self._sock.send(frame, copy=False)
        if fut.done() and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]

    async def _recv(self) -> tuple[int, list[Any]]:
        assert self._sock is not None
        return 0, await self._sock.recv_multipart(copy=False)

    async def _close_transport(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            linger = _SHUTDOWN_LINGER_MS if self._connected and not self._lost else 0
            self._sock.close(linger=linger)
            self._sock = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await run_in_thread(ctx.term)  # may wait up to the linger for the Shutdown to leave

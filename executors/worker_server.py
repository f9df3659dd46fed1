"""`aiosched worker`: serve a model to a remote engine over ZeroMQ, CurveZMQ by default.

    aiosched keygen --out keys --name worker            # on the worker host
    aiosched keygen --out keys --name engine            # on the engine host
    aiosched worker --listen tcp://0.0.0.0:7777 --runner torch --model DIR \\
        --secret-key keys/worker.secret --allow engine.public

The worker binds a ROUTER socket. With keys it is a CurveZMQ server and a ZAP
authenticator (`zmq.auth.thread.ThreadAuthenticator`) admits only the client
public keys given with `--allow`: a client with another key, or without Curve,
fails the handshake and never reaches this loop, so it cannot disturb the worker.
`--insecure` serves plaintext and binds to loopback only, unless `--listen` names
another host *and* `--insecure-any-host` is given.

One engine session at a time (see `aiosched.executors.worker_loop.Session`): `Hello` from a
client starts it, with the client's config, except that the worker's own
`--runner`, `--model` and `--device` win (pin `--model`: otherwise the client's
path is loaded). While a session runs, other clients get a fatal "busy" error to
their `Hello` (Heartbeats are still answered). The session ends on `Shutdown`, when
the client's connection is gone (a heartbeat to it cannot be routed), or when the
client is silent for twice its `worker_timeout_s`; the runner is then released and
the next engine can connect. Heartbeats go both ways: the worker answers the
engine's and sends its own to the session's client.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator

from aiosched.config import EngineConfig
from aiosched.protocol import MAX_FRAME_BYTES, Heartbeat, Hello, encode
from aiosched.executors.keys import load_public_key, load_secret_key
from aiosched.executors.runner import create_runner
from aiosched.executors.worker_loop import POLL_MS, RunnerFactory, Session, error_frame, parse_frames

log = logging.getLogger("aiosched.worker")

ZAP_DOMAIN = "aiosched"
_LOOPBACK = ("localhost", "::1", "[::1]")


@dataclass
class ServerOptions:
    listen: str = "tcp://127.0.0.1:7777"
    runner: str | None = None  # overrides the client's config
    model: str | None = None
    device: str | None = None
    keys: tuple[bytes, bytes] | None = None  # (public, secret) Z85; None = insecure
    allowed: set[bytes] = field(default_factory=set)  # Z85 client public keys

    @property
    def secure(self) -> bool:
        return self.keys is not None


def split_endpoint(listen: str) -> tuple[str, str]:
    """'tcp://HOST:PORT' -> (HOST, PORT); port 0 or * means any free port."""
    if not listen.startswith("tcp://"):
        raise ValueError(f"--listen: expected tcp://HOST:PORT, got {listen!r}")
    host, sep, port = listen[len("tcp://"):].rpartition(":")
    if not sep or not host or not (port.isdigit() or port == "*"):
        raise ValueError(f"--listen: expected tcp://HOST:PORT, got {listen!r}")
    return host, port


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def check_listen(listen: str, insecure: bool, insecure_any_host: bool) -> str:
    """The endpoint to bind; plaintext only on loopback unless explicitly allowed."""
    host, port = split_endpoint(listen)
    if insecure and not is_loopback(host) and not insecure_any_host:
        raise ValueError(f"--insecure serves plaintext, so it binds to loopback only; to listen on {host} "
                         "pass --insecure-any-host as well (anyone who can reach the port can use the worker)")
    return f"tcp://{host}:{'*' if port == '0' else port}"


class WorkerServer:
    """`runner_factory` replaces create_runner (tests and benchmarks)."""

    def __init__(self, opts: ServerOptions, runner_factory: RunnerFactory = create_runner) -> None:
        self.opts = opts
        self.runner_factory = runner_factory
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.sndhwm = self.sock.rcvhwm = 0
        self.sock.router_mandatory = 1  # a reply to a vanished client raises: the session ends
        self.sock.maxmsgsize = 2 * MAX_FRAME_BYTES  # a client sending more is disconnected outright
        self.sock.heartbeat_ivl, self.sock.heartbeat_timeout = 2000, 10000  # drop half-open TCP peers
        self.session: Session | None = None
        self.client: bytes | None = None
        self.sessions_served = 0
        self.stuck_sessions = 0  # sessions whose runner thread did not stop
        self._hb_seq = 0
        self._last_hb = 0.0
        self._denied_logged: dict[bytes, float] = {}

    # ---- setup ----

    def bind(self) -> str:
        """Start the authenticator (first: CurveZMQ without ZAP would admit any key), bind; the endpoint."""
        if self.opts.keys is not None:
            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("aiosched.worker.zap"))
            self.auth.start()
            self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
            public, secret = self.opts.keys
            self.sock.curve_server = True
            self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
            self.sock.zap_domain = ZAP_DOMAIN.encode()
        self.sock.bind(self.opts.listen)
        return self.sock.last_endpoint.decode()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (authenticator thread): is this client key allowed?"""
        ok = key in self.opts.allowed
        if not ok:
            now = time.monotonic()
            if now - self._denied_logged.get(key, -1e9) > 60:
                self._denied_logged[key] = now
                log.warning("refused a client with public key %s (not in --allow)", key.decode(errors="replace"))
        return ok

    def prepare(self, config: EngineConfig) -> EngineConfig:
        """The client's config with the worker's own runner/model/device."""
        if config.tensor_parallel_size != 1:
            raise ValueError(f"this worker serves tensor_parallel_size = 1 only, the engine asked for {config.tensor_parallel_size}")
        changes = {k: v for k, v in (("runner", self.opts.runner), ("model", self.opts.model), ("device", self.opts.device)) if v}
        return config.replace(**changes) if changes else config

    # ---- the loop ----

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        watched: zmq.Socket | None = None  # the current session's reply socket
        while not stop.is_set():
            current = self.session.replies if self.session is not None else None
            if watched is not current:
                if watched is not None:
                    poller.unregister(watched)
                if current is not None:
                    poller.register(current, zmq.POLLIN)
                watched = current
            events = dict(poller.poll(POLL_MS))
            if current is not None and current in events and self.session is not None:
                for frame in self.session.pending_replies():
                    self._to_client(frame)
            if self.sock in events:
                self._drain_socket()
            self._session_upkeep()

    def _drain_socket(self) -> None:
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(parts[0].bytes, parts[1:])

    def _on_message(self, ident: bytes, frames: list[zmq.Frame]) -> None:
        msg, err = parse_frames(frames)
        if err is not None:
            self._reply(ident, err)
            return
        assert msg is not None
        if self.session is not None and ident == self.client:
            reply, over = self.session.handle(msg)
            if reply is not None:
                self._to_client(reply)
            if over:
                self._end_session("client sent Shutdown")
        elif isinstance(msg, Heartbeat):
            self._reply(ident, encode(msg))
        elif isinstance(msg, Hello):
            self._start_session(ident, msg)
        else:
            self._reply(ident, error_frame(f"{type(msg).__name__} outside a session: send Hello first", fatal=False))

    def _start_session(self, ident: bytes, hello: Hello) -> None:
        if self.session is not None:  # is the current client still there? (it may have just crashed)
            self._hb_seq += 1
            self._to_client(encode(Heartbeat(self._hb_seq)))
        if self.session is not None:
            self._reply(ident, error_frame("worker is busy serving another engine; try again when it is done", fatal=True))
            return
        session = Session(self.ctx, prepare=self.prepare, runner_factory=self.runner_factory)
        reply, _ = session.handle(hello)
        if not session.started:  # refused (version, config): report and forget
            session.close()
            self._reply(ident, reply or error_frame("Hello refused", fatal=True))
            return
        self.session, self.client = session, ident
        self.sessions_served += 1
        log.info("session %d started (runner %s)", self.sessions_served, session.config.runner if session.config else "?")

    def _session_upkeep(self) -> None:
        """Heartbeat the client; end the session if it is gone or silent."""
        if self.session is None or self.session.config is None:
            return
        now = time.monotonic()
        timeout = self.session.config.worker_timeout_s
        if now - self.session.last_heard > 2 * timeout:
            self._end_session(f"client silent for {2 * timeout:.1f}s")
            return
        if now - self._last_hb >= min(1.0, timeout / 10):
            self._last_hb = now
            self._hb_seq += 1
            self._to_client(encode(Heartbeat(self._hb_seq)))

    def _reply(self, ident: bytes, frame: bytes | zmq.Frame) -> bool:
        try:
            self.sock.send_multipart([ident, frame], copy=False)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: that client is gone
            log.debug("reply to a vanished client dropped: %s", e)
            return False

    def _to_client(self, frame: bytes | zmq.Frame) -> None:
        if self.client is not None and not self._reply(self.client, frame):
            self._end_session("client connection lost")

    def _end_session(self, why: str) -> None:
        if self.session is None:
            return
        log.info("session %d ended: %s", self.sessions_served, why)
        if not self.session.close():
            self.stuck_sessions += 1
        self.session, self.client = None, None

    def close(self) -> None:
        self._end_session("worker shutting down")
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if not self.stuck_sessions:  # a stuck runner thread may hold a socket: term() would wait forever
            self.ctx.term()


# ---- `aiosched worker` ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="tcp://127.0.0.1:7777", help="tcp://HOST:PORT to bind (port 0: any free port)")
    parser.add_argument("--runner", choices=("torch", "jax", "fake"), help="model runner (overrides the engine's)")
    parser.add_argument("--model", help="model directory (overrides the engine's; recommended)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (overrides the engine's)")
    parser.add_argument("--secret-key", help="this worker's secret key file (from `aiosched keygen`)")
    parser.add_argument("--allow", action="append", default=[], metavar="PUBKEYFILE",
                        help="an engine public key file allowed to connect (repeatable)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no authentication (loopback only)")
    parser.add_argument("--insecure-any-host", action="store_true", help="with --insecure: allow a non-loopback --listen")
    parser.add_argument("--log-level", default="INFO", help="logging level")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if args.insecure_any_host and not args.insecure:
        raise ValueError("--insecure-any-host only makes sense with --insecure")
    if args.insecure and (args.secret_key or args.allow):
        raise ValueError("--insecure and --secret-key/--allow exclude each other")
    if not args.insecure and (not args.secret_key or not args.allow):
        raise ValueError("pass --secret-key FILE and at least one --allow PUBKEYFILE (or --insecure for loopback plaintext)")
    if args.device is not None:
        EngineConfig(device=args.device)  # validates (ValueError names the field)
    opts = ServerOptions(listen=check_listen(args.listen, args.insecure, args.insecure_any_host),
                         runner=args.runner, model=args.model, device=args.device)
    if not args.insecure:
        opts.keys = load_secret_key(args.secret_key)
        opts.allowed = {load_public_key(path) for path in args.allow}
    return opts


def main(args: argparse.Namespace, runner_factory: RunnerFactory = create_runner) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = options_from_args(args)
    server = WorkerServer(opts, runner_factory)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        endpoint = server.bind()
        mode = f"CurveZMQ, {len(opts.allowed)} allowed key(s)" if opts.secure else "INSECURE plaintext"
        print(f"aiosched worker listening on {endpoint} ({mode})", flush=True)
        server.serve(stop)
    finally:
        server.close()
    return 0

"""Prefix-affinity request routing for the Ray Serve replicas of examples/ray_serve_app.py.

Run: not a script of its own; `python examples/ray_serve_app.py --model DIR --replicas 2`
routes with it (`--router prefix`, the default; `--router pow2` is Ray Serve's own
router behind the same ingress, for comparison).

Requests that share a prompt prefix go to the replica that served that prefix
last, so its engine finds the prefix's KV blocks in its prefix cache instead of
computing them again on another replica.

- The key: the request's leading text (the completion prompt; for chat, the tools
  and the messages rendered in order), cut into fixed-size chunks of characters,
  each chunk hashed together with the chunks before it (so a chunk's hash names
  the whole prefix up to its end, as the engine's block hashes do for tokens).
- Affinity: a bounded LRU table, chunk hash -> the replica that last served a
  request with that prefix. The replica of the deepest matching chunk holds the
  longest cached prefix.
- Fallback: when nothing matches, or the matching replica's queue (requests in
  flight there, as Ray Serve's router tracks them) is at `max_load` or more, the
  less loaded of two random replicas (Ray's power-of-two choice); a tie goes to
  the replica that owns fewer table entries, so new prefixes spread over the
  replicas. The replica a request was sent to becomes its prefix's owner.

The router runs wherever a handle to the engine deployment lives: in
`PrefixRoutedIngress` (examples/ray_serve_app.py), which reads each HTTP body and
passes the request on as the first argument of `OpenAIEngine.forward` (a dict with,
among others, "path" and the raw "body"). Ray
Serve's HTTP proxy never sees request bodies (they stream to the replica after
it is chosen), so the engine replicas cannot be routed by prompt straight from
the proxy. Each ingress replica keeps its own table.

The choice logic (`PrefixAffinity`, `leading_text`, `chunk_hashes`) knows nothing
of Ray; `PrefixAffinityRouter` adapts it to Ray Serve's `RequestRouter` API.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, OrderedDict
from typing import Any, Callable, Sequence

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter  # Ray's default; no public path
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# Router kwargs (RequestRouterConfig.request_router_kwargs) and their defaults.
DEFAULTS: dict[str, int] = {
    "chunk_chars": 64,  # ~16 tokens of English text: one KV block at the engine's default block_size
    "max_chunks": 32,  # only the first 2 KiB of text decide the replica
    "max_load": 16,  # a matching replica with this many requests in flight is skipped
    "capacity": 100_000,  # table entries (chunk hashes) kept, least recently used dropped first
}


def _prompt_text(prompt: Any) -> str | None:
    """A completion prompt as text: a string, token ids, or (a batch) its first element."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return "ids:" + ",".join(map(str, prompt))  # token ids share prefixes as their text does
        return _prompt_text(prompt[0])
    return None


def _content_text(content: Any) -> str:
    """A message's content: a string, or the parts in order (text as is, other parts as JSON)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str)
                       else json.dumps(p, sort_keys=True) for p in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def _chat_text(body: dict[str, Any]) -> str | None:
    """The chat request as the text a chat template would start from: tools first, then each message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    parts = [json.dumps(body["tools"], sort_keys=True)] if body.get("tools") else []
    for m in messages:
        if not isinstance(m, dict):
            return None
        extra = json.dumps(m["tool_calls"], sort_keys=True) if m.get("tool_calls") else ""
        parts.append(f"<|{m.get('role', '')}|>{_content_text(m.get('content'))}{extra}")
    return "\n".join(parts)


def leading_text(path: str, body: Any) -> str | None:
    """The text whose prefix decides the replica, for /v1/completions and /v1/chat/completions bodies.

    None for other routes and bodies that are not such requests (the replica answers those;
    the router only needs no key for them)."""
    if not isinstance(body, dict):
        return None
    if path.endswith("/chat/completions"):
        return _chat_text(body)
    if path.endswith("/completions"):
        return _prompt_text(body.get("prompt"))
    return None


def chunk_hashes(text: str, chunk_chars: int, max_chunks: int) -> list[int]:
    """Chained hashes of the text's chunks: hash i covers characters [0, (i + 1) * chunk_chars).

    The last chunk may be shorter (a prompt shorter than one chunk still has a key). blake2b, not
    `hash()`: the same text gives the same key in every process."""
    out: list[int] = []
    digest = b""
    for start in range(0, min(len(text), chunk_chars * max_chunks), chunk_chars):
        digest = hashlib.blake2b(digest + text[start:start + chunk_chars].encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
    return out


def request_chain(path: str, body: bytes | str, chunk_chars: int, max_chunks: int) -> list[int]:
    """The routing key of one HTTP request (its path and raw JSON body); [] when it has none."""
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return []  # not JSON: the replica answers 400, any replica will do
    text = leading_text(path, parsed)
    return chunk_hashes(text, chunk_chars, max_chunks) if text else []


class PrefixAffinity:
    """Which replica owns each prefix (chained chunk hash), and where a request should go."""

    def __init__(self, max_load: int = DEFAULTS["max_load"], capacity: int = DEFAULTS["capacity"],
                 rng: random.Random | None = None) -> None:
        for name, value in (("max_load", max_load), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        self.max_load = max_load
        self.capacity = capacity
        self._rng = rng or random.Random()
        self._owner: OrderedDict[int, str] = OrderedDict()  # least recently recorded first
        self._owned: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._owner)

    def owned(self, replica: str) -> int:
        """Table entries (prefix chunks) this replica owns."""
        return self._owned[replica]

    def match(self, chain: Sequence[int]) -> tuple[str | None, int]:
        """The owner of the longest recorded prefix of `chain`, and how many chunks it covers."""
        owner, depth = None, 0
        for i, h in enumerate(chain):
            r = self._owner.get(h)
            if r is None:
                break  # chained: no deeper chunk can match without this one
            owner, depth = r, i + 1
        return owner, depth

    def record(self, chain: Sequence[int], replica: str) -> None:
        """`replica` served a request with this prefix: it owns every chunk of it now."""
        for h in chain:
            prev = self._owner.pop(h, None)
            if prev is not None:
                self._owned[prev] -= 1
            self._owner[h] = replica
            self._owned[replica] += 1
        while len(self._owner) > self.capacity:
            _, r = self._owner.popitem(last=False)
            self._owned[r] -= 1

    def forget(self, replica: str) -> None:
        """A replica is gone: its prefixes are free for others to claim."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]
        self._owned.pop(replica, None)

    def least_loaded_of_two(self, candidates: Sequence[str], load: Callable[[str], int]) -> list[str]:
        """Two random candidates (all, if two or fewer), best first: lower load, then fewer owned prefixes."""
        pair = list(candidates) if len(candidates) <= 2 else self._rng.sample(list(candidates), 2)
        self._rng.shuffle(pair)  # equal on both counts: either, at random
        return sorted(pair, key=lambda r: (load(r), self._owned[r]))

    def rank(self, chain: Sequence[int], candidates: Sequence[str], load: Callable[[str], int]) -> list[str]:
        """Replicas to try, in order: the prefix's owner when it is a candidate under `max_load`,
        then the power-of-two choice. `load(r)`: requests in flight at r (0 when unknown)."""
        fallback = self.least_loaded_of_two(candidates, load)
        owner, _ = self.match(chain)
        if owner is not None and owner in candidates and load(owner) < self.max_load:
            return [owner] + [r for r in fallback if r != owner]
        return fallback


def check_options(options: dict[str, Any]) -> dict[str, int]:
    """The router's kwargs with the defaults filled in; ValueError naming a bad or unknown one."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a PrefixAffinityRouter option (known: {sorted(DEFAULTS)})")
    opts = {**DEFAULTS, **options}
    for name, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    return opts


def pinned_replica(candidates: Sequence[RunningReplica], pending_request: PendingRequest | None) -> RunningReplica | None:
    """The candidate a call names with a `replica_id=` keyword (per-replica introspection), if any."""
    pinned = pending_request.kwargs.get("replica_id") if pending_request is not None else None
    if not isinstance(pinned, str):
        return None
    return next((r for r in candidates if r.replica_id.unique_id == pinned), None)


class PinnedPowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (the less loaded of two random replicas) for every request, except
    that a call naming a replica (`replica_id=`) goes to it: `pow2` routing, with per-replica
    `engine_stats` for the benchmark's comparison. (Ray's router hands a replica it found to the
    oldest waiting request, so a named call is exact when nothing else waits at this router.)"""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pinned = pinned_replica(candidate_replicas, pending_request)
        if pinned is not None:
            return [[pinned]]
        return await super().choose_replicas(candidate_replicas, pending_request)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: `PrefixAffinity` over the engine replicas.

    Configure with `RequestRouterConfig(request_router_class=PrefixAffinityRouter,
    request_router_kwargs={...})`; the kwargs are `DEFAULTS`' keys. A call with a
    `replica_id=` keyword naming a running replica goes to that replica (per-replica
    introspection such as `engine_stats`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()  # the defaults, until Ray Serve passes the configured kwargs

    def initialize_state(self, **kwargs: Any) -> None:
        opts = check_options(kwargs)
        self._chunk_chars: int = opts["chunk_chars"]
        self._max_chunks: int = opts["max_chunks"]
        self._affinity = PrefixAffinity(opts["max_load"], opts["capacity"])

    def _chain(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None or not pending_request.args:
            return []
        req = pending_request.args[0]
        if not isinstance(req, dict) or not isinstance(req.get("path"), str):
            return []
        return request_chain(req["path"], req.get("body") or b"", self._chunk_chars, self._max_chunks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not by_id:
            return []
        pinned = pinned_replica(candidate_replicas, pending_request)
        if pinned is not None:
            return [[pinned]]

        def load(rid: str) -> int:  # unknown (not probed yet, or stale): assume idle, Ray probes it before sending
            return self.replica_queue_len_cache.get(by_id[rid].replica_id) or 0

        chain = self._chain(pending_request)
        order = self._affinity.rank(chain, list(by_id), load)
        if chain:
            # Claim the prefix now, before this request is even sent, so the requests right behind it
            # with the same prefix follow it; `on_request_routed` corrects it if another replica took it.
            self._affinity.record(chain, order[0])
        return [[by_id[rid]] for rid in order]  # one rank each: Ray tries them strictly in this order

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        chain = self._chain(pending_request)
        if chain:
            self._affinity.record(chain, replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self._replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for rid in gone:
            self._affinity.forget(rid.unique_id)

"""JaxModelRunner: Llama-family models in JAX over a paged KV cache, sampling on the device.

Per step, on the launch thread (`execute`, which never waits for the device):
1. apply `freed_req_ids`, then `new_requests` (each gets a row of the device token
   buffer; its known tokens are written there by a small donated-buffer program);
2. flatten the ragged batch on the host (numpy) and pad it to a bucketed shape:
   tokens T (powers of two from 16 up to max_num_batched_tokens; decode-only steps
   use T = R), requests R (powers of two from 4 up to max_num_seqs), blocks per
   request P (powers of two up to max_model_len / block_size), query tiles
   NT = T / Qt + R. All int metadata travels as one int32 array, all float metadata
   as one float32 array (two host-to-device copies per step);
3. dispatch the step program (`jit`, KV cache and token buffer donated, so both are
   updated in place): input ids are gathered from the token buffer on the device,
   so a step can consume the token the previous step sampled before the host has
   seen it (async scheduling); the sampled tokens are written back into the buffer;
4. return a PendingOutput holding the device array of sampled ids; `result()` (on
   the executor's result thread) is the only place that waits (`np.asarray`).

Compiled programs are cached per bucket key in this module (shared by runners of the
same model and shapes in one process); `compile_stats()` reports how many were
compiled and how long that took. `AIOSCHED_JAX_PRECOMPILE=1` compiles every bucket
the config can reach at load time (ahead-of-time, from shapes only);
`AIOSCHED_JAX_PRECOMPILE=reqs=4,len=350` only those of at most 4 requests of at most
350 tokens (others still compile on first use).

Layers run under `lax.scan` on CPU (one layer body to compile) and unrolled on GPU/TPU
(a GPU while loop costs a host round trip per layer; the TPU kernel wants per-layer
caches); AIOSCHED_JAX_SCAN_LAYERS=0/1 overrides. Attention: `jax_paged.select_attention`
(portable jnp paged attention; the Pallas ragged paged attention kernel on TPU only).
AIOSCHED_JAX_TILE sets the query-tile rows (default 32); AIOSCHED_JAX_FAST_COMPILE=1
compiles at XLA backend optimisation level 0 (tests).

Random weights (no checkpoint, e.g. benchmarks of a model shape): `load_format =
"random"` and a model dir holding only config.json; the weights are drawn on the device.

Sampling on the device: greedy, temperature, top-k, top-p, min-p, seeded (Gumbel-max
with counter-based noise), logit_bias, bad_token_ids, min_tokens (EOS/stop ids masked),
presence/frequency/repetition penalties (from the device token buffer); logprobs and
prompt logprobs (raw model logprobs, top 20 computed on the device when a row asks).
Which of these a batch needs is static in its bucket key: a greedy batch compiles to a
plain argmax. Not supported: speculative decoding (draft tokens), tensor parallelism,
structured output (the engine rejects such requests: not in WorkerInfo.features).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aiosched.config import EngineConfig
from aiosched.protocol import PROTOCOL_VERSION, Logprobs, NewRequestData, RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.sampling_params import SamplingParams
from aiosched.executors.jax import paged_attention as jax_paged
from aiosched.executors.jax import llama as llama_jax
from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput
from aiosched.executors.jax.sampler import SamplingMetadata, sample

log = logging.getLogger("aiosched.jax")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MIN_TOKEN_BUCKET = 16
MIN_REQ_BUCKET = 4
MIN_BIAS_SLOTS = 8
MIN_BLOCK_TOKENS = 128  # the smallest blocks-per-request bucket covers this many tokens
SAMPLE_RANDOM, SAMPLE_FILTERS, SAMPLE_PENALTIES = 1, 2, 4  # Shape.sampling bits
SAMPLE_LOGPROBS, PROMPT_LOGPROBS = 8, 16  # top-MAX_LOGPROBS raw logprobs of sampled / prompt tokens
MAX_LOGPROBS = 20  # SamplingParams allows up to 20; the device computes 20, the host slices


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n (at least lo), capped at hi (hi itself is a bucket)."""
    return min(_pow2_at_least(n, lo), hi) if n <= hi else _pow2_at_least(n, lo)


# ---------------------------------------------------------------- compile cache

_PROGRAMS: dict[tuple[Any, ...], Any] = {}
_PROGRAMS_LOCK = threading.Lock()
_STATS: dict[str, Any] = {"programs": 0, "compile_s": 0.0, "step_programs": 0, "write_programs": 0, "precompile_wall_s": 0.0,
                          "precompile_threads": 0}


_RUNS: list[dict[str, Any]] = []  # one entry per runner shut down: host time per step


def compile_stats() -> dict[str, Any]:
    """Programs compiled in this process so far and the seconds spent compiling them
    (summed over programs: with parallel precompilation the wall time is less), and
    each finished runner's host time per step (`runs`)."""
    return {**_STATS, "runs": list(_RUNS)}


def _compiler_options() -> dict[str, Any] | None:
    """AIOSCHED_JAX_FAST_COMPILE=1: XLA backend optimisation level 0 (compiles ~3x faster
    on CPU, runs slower; for tests of tiny models)."""
    if os.environ.get("AIOSCHED_JAX_FAST_COMPILE", "") not in ("", "0"):
        return {"xla_backend_optimization_level": 0}
    return None


def _compiled(key: tuple[Any, ...], kind: str, lower: Callable[[], Any]) -> Any:
    """The compiled program for `key`, compiled once from `lower()` (thread-safe:
    different keys compile concurrently, a second caller of a key waits for the first)."""
    with _PROGRAMS_LOCK:
        entry = _PROGRAMS.get(key)
        owner = entry is None
        if owner:
            entry = _PROGRAMS[key] = Future()
    if not isinstance(entry, Future):
        return entry
    if not owner:
        return entry.result()
    try:
        t0 = time.perf_counter()
        prog = lower().compile(compiler_options=_compiler_options())
        dt = time.perf_counter() - t0
    except BaseException as e:
        with _PROGRAMS_LOCK:
            _PROGRAMS.pop(key, None)
        entry.set_exception(e)
        raise
    with _PROGRAMS_LOCK:
        _PROGRAMS[key] = prog
        _STATS["programs"] += 1
        _STATS[f"{kind}_programs"] += 1
        _STATS["compile_s"] += dt
        n, total = _STATS["programs"], _STATS["compile_s"]
    entry.set_result(prog)
    log.info("jax: compiled %s program %s in %.2fs (%d programs, %.1fs total)", kind, key[-1], dt, n, total)
    return prog


# ---------------------------------------------------------------- step layout


class Shape(NamedTuple):
    """One bucket: everything that changes the compiled step program."""

    T: int  # padded tokens
    R: int  # padded requests (= sampled rows)
    NT: int  # query tiles
    Qt: int  # rows per tile
    P: int  # blocks per request
    M: int  # logit-bias slots per sampled row
    sampling: int = 0  # bits: SAMPLE_RANDOM, SAMPLE_FILTERS, SAMPLE_PENALTIES (0: greedy only)

    def int_fields(self) -> list[tuple[str, tuple[int, ...]]]:
        return _layout(self)[0]

    def float_fields(self) -> list[tuple[str, tuple[int, ...]]]:
        return _layout(self)[1]

    @property
    def n_int(self) -> int:
        return _layout(self)[2]

    @property
    def n_float(self) -> int:
        return _layout(self)[3]


Fields = list[tuple[str, tuple[int, ...]]]


@functools.lru_cache(maxsize=None)
def _layout(shape: Shape) -> tuple[Fields, Fields, int, int]:
    """(int fields, float fields, total ints, total floats) of a bucket's packed metadata."""
    T, R, NT, Qt, P, M = shape[:6]
    ints: Fields = [
        ("tok_row", (T,)), ("tok_pos", (T,)), ("slot_block", (T,)), ("slot_offset", (T,)), ("token_row", (T,)),
        ("tile_token", (NT, Qt)), ("tile_pos", (NT, Qt)), ("tile_blocks", (NT, P)),
        ("req_blocks", (R, P)), ("req_kv_len", (R,)), ("cu_q_len", (R + 1,)), ("num_reqs", (1,)),
        ("logits_idx", (R,)), ("samp_row", (R,)), ("samp_pos", (R,)), ("top_k", (R,)),
        ("seed_lo", (R,)), ("seed_hi", (R,)), ("bias_ids", (R, M)), ("prompt_len", (R,)),
    ]
    floats: Fields = [("temperature", (R,)), ("top_p", (R,)), ("min_p", (R,)), ("bias_val", (R, M)),
                      ("presence", (R,)), ("frequency", (R,)), ("repetition", (R,))]
    size = lambda fs: sum(math.prod(s) for _, s in fs)  # noqa: E731
    return ints, floats, size(ints), size(floats)


def _views(flat: Any, fields: Fields) -> dict[str, Any]:
    """Named views (numpy) or slices (traced jax) of one flat array."""
    out, o = {}, 0
    for name, shape in fields:
        n = math.prod(shape)
        out[name] = flat[o: o + n].reshape(shape)
        o += n
    return out


_INT_PAD = {"tok_row": "row", "slot_block": "block", "tile_blocks": "block", "req_blocks": "block", "tile_pos": -1, "samp_row": "row"}
_FLOAT_PAD = {"top_p": 1.0, "repetition": 1.0}


class _HostBatch:
    """One step's metadata on the host: two flat arrays (what is sent) and named views
    into them (what is filled in), copied from a per-bucket template of padding values."""

    def __init__(self, shape: Shape, templates: dict[Shape, tuple[np.ndarray, np.ndarray]], scratch_block: int, scratch_row: int) -> None:
        tpl = templates.get(shape)
        if tpl is None:
            ints = np.zeros(shape.n_int, np.int32)
            floats = np.zeros(shape.n_float, np.float32)
            for name, v in _views(ints, shape.int_fields()).items():
                pad = _INT_PAD.get(name, 0)
                v[...] = scratch_row if pad == "row" else scratch_block if pad == "block" else pad
            for name, v in _views(floats, shape.float_fields()).items():
                v[...] = _FLOAT_PAD.get(name, 0.0)
            tpl = templates[shape] = (ints, floats)
        self.ints, self.floats = tpl[0].copy(), tpl[1].copy()
        self.i = _views(self.ints, shape.int_fields())
        self.f = _views(self.floats, shape.float_fields())


# ---------------------------------------------------------------- the device programs


def _step_fn(params: Any, kv: Any, tokbuf: jax.Array, ints: jax.Array, floats: jax.Array, *,
             shape: Shape, arch: llama_jax.LlamaArch, attention: Any, scan_layers: bool) -> tuple[Any, jax.Array, jax.Array]:
    i = _views(ints, shape.int_fields())
    f = _views(floats, shape.float_fields())
    ids = tokbuf[i["tok_row"], i["tok_pos"]]  # known tokens and the previous steps' samples alike
    meta = jax_paged.AttentionMetadata(
        slot_block=i["slot_block"], slot_offset=i["slot_offset"], tile_token=i["tile_token"], tile_pos=i["tile_pos"],
        tile_blocks=i["tile_blocks"], token_row=i["token_row"], req_blocks=i["req_blocks"], req_kv_len=i["req_kv_len"],
        cu_q_len=i["cu_q_len"], num_reqs=i["num_reqs"])
    prompt_lp = bool(shape.sampling & PROMPT_LOGPROBS)
    logits, kv = llama_jax.forward(params, kv, ids, i["tok_pos"], meta, i["logits_idx"], arch=arch, attention=attention,
                                   scan_layers=scan_layers, all_logits=prompt_lp)
    extras: tuple[jax.Array, ...] = ()
    if prompt_lp:  # raw logprob of each row's next token (the prompt token at position + 1) and the top-k
        nxt = tokbuf[i["tok_row"], jnp.minimum(i["tok_pos"] + 1, tokbuf.shape[1] - 1)]
        extras += _logprobs(logits, nxt)
        logits = logits[i["logits_idx"]]
    sm = SamplingMetadata(
        temperature=f["temperature"], top_k=i["top_k"], top_p=f["top_p"], min_p=f["min_p"],
        seed_lo=jax.lax.bitcast_convert_type(i["seed_lo"], jnp.uint32), seed_hi=jax.lax.bitcast_convert_type(i["seed_hi"], jnp.uint32),
        position=i["samp_pos"], bias_ids=i["bias_ids"], bias_val=f["bias_val"], presence=f["presence"],
        frequency=f["frequency"], repetition=f["repetition"], prompt_len=i["prompt_len"])
    toks = sample(logits, sm, history=lambda: tokbuf[i["samp_row"]], random=bool(shape.sampling & SAMPLE_RANDOM),
                  filters=bool(shape.sampling & SAMPLE_FILTERS), penalties=bool(shape.sampling & SAMPLE_PENALTIES))
    tokbuf = tokbuf.at[i["samp_row"], i["samp_pos"]].set(toks, mode="drop")
    if shape.sampling & SAMPLE_LOGPROBS:  # raw model logprobs (before penalties, bias, temperature)
        extras = _logprobs(logits, toks) + extras
    return kv, tokbuf, toks, extras


def _logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logprob of `tokens` [N], top ids [N, k], top logprobs [N, k]) of log_softmax(logits)."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, lp.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_lp


def _write_tokens_fn(tokbuf: jax.Array, rows: jax.Array, cols: jax.Array, vals: jax.Array) -> jax.Array:
    return tokbuf.at[rows, cols].set(vals, mode="drop")


_write_tokens = jax.jit(_write_tokens_fn, donate_argnums=(0,))


# ---------------------------------------------------------------- worker-side request state


@dataclass
class _Req:
    row: int  # token-buffer row
    prompt_len: int
    sampling: SamplingParams
    seed: int
    masked: list[int]  # eos + stop ids: masked until min_tokens are out
    blocks: list[int] = field(default_factory=list)
    bias: dict[int, float] = field(default_factory=dict)
    sampling_bits: int = 0  # which sampler features this request needs (Shape.sampling)


def _check_sampling(sp: SamplingParams) -> None:
    unsupported = {"structured": sp.structured is not None}
    for name, bad in unsupported.items():
        if bad:
            raise NotImplementedError(f"{name}: not supported by the JAX runner yet")


class _JaxPending(PendingOutput):
    """Device arrays of one step; `result()` copies them to the host (the only wait).

    `lp_rows`: (output index, k) of the sampled rows that asked for logprobs;
    `plp`: (req_id, k, first flat row, count) of the requests that get prompt logprobs."""

    def __init__(self, step_id: int, req_ids: list[str], toks: jax.Array, extras: tuple[jax.Array, ...] = (),
                 lp_rows: list[tuple[int, int]] | None = None, plp: list[tuple[str, int, int, int]] | None = None) -> None:
        self.step_id, self.req_ids, self.toks, self.extras = step_id, req_ids, toks, extras
        self.lp_rows, self.plp = lp_rows or [], plp or []
        for a in (toks, *extras):
            try:
                a.copy_to_host_async()  # start the device-to-host copies as soon as the step ends
            except Exception:  # pragma: no cover - not every backend/array supports it
                pass

    def result(self) -> RunnerOutput:
        n = len(self.req_ids)
        toks = np.asarray(self.toks)[:n]
        out = RunnerOutput(step_id=self.step_id, req_ids=self.req_ids, sampled_token_ids=[[int(t)] for t in toks])
        ex = [np.asarray(a) for a in self.extras]
        if self.lp_rows:
            chosen, ids, vals = ex[:3]
            ex = ex[3:]
            lps: list[Logprobs | None] = [None] * n
            for r, k in self.lp_rows:
                lps[r] = Logprobs([float(chosen[r])], [ids[r, :k].tolist()], [vals[r, :k].tolist()])
            out.logprobs = lps
        if self.plp:
            chosen, ids, vals = ex[:3]
            out.prompt_logprobs = {
                rid: Logprobs(chosen[t0:t0 + c].tolist(), ids[t0:t0 + c, :k].tolist(), vals[t0:t0 + c, :k].tolist())
                for rid, k, t0, c in self.plp}
        return out


class JaxModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1, *, tile_size: int | None = None,
                 scan_layers: bool | None = None) -> None:
        super().__init__(config, rank, world_size)
        if world_size != 1 or config.tensor_parallel_size != 1:
            raise NotImplementedError("tensor_parallel_size: the JAX runner runs on one device")
        if config.speculative is not None:
            raise NotImplementedError("speculative: not supported by the JAX runner")
        self.tile_size = tile_size or int(os.environ.get("AIOSCHED_JAX_TILE", "32"))
        self._scan_layers = scan_layers
        self.reqs: dict[str, _Req] = {}
        self._progs: dict[Shape, Any] = {}  # this runner's view of the module cache
        self._templates: dict[Shape, tuple[np.ndarray, np.ndarray]] = {}
        self.steps = 0
        self.tokens_computed = 0
        self.host_s = 0.0  # in execute(): bookkeeping, packing, dispatch

    # ---------------------------------------------------------------- load

    def _device(self) -> Any:
        if self.config.device == "cpu":
            return jax.devices("cpu")[0]
        backend = jax.default_backend()
        if backend == "cpu":
            raise RuntimeError(f"device={self.config.device!r}, but JAX sees no accelerator (install jax[cuda12] or jax[cuda13])")
        idx = int(self.config.device.split(":")[1]) if ":" in self.config.device else 0
        return jax.devices(backend)[idx]

    def load(self) -> WorkerInfo:
        cfg = self.config
        model_dir = cfg.resolved_model
        if model_dir is None:
            raise ValueError("model: the JAX runner needs an HF-layout model dir (config.json + *.safetensors)")
        self.device = self._device()
        # Every array a program reads lives on this device: the host inputs are put there
        # explicitly and the programs are lowered for it, so JAX's default device (a GPU on
        # a GPU host, while this runner may run on the CPU) never receives one of them.
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)
        self.platform = self.device.platform
        self.arch = llama_jax.LlamaArch.from_dir(model_dir)
        self.dtype_name = cfg.resolved_dtype
        self.dtype = _DTYPES[self.dtype_name]
        self.attn_name, self.attention = jax_paged.select_attention(self.platform)
        env_scan = os.environ.get("AIOSCHED_JAX_SCAN_LAYERS", "")
        if self._scan_layers is not None:
            self.scan_layers = self._scan_layers
        elif env_scan:
            self.scan_layers = env_scan not in ("0", "false")
        else:  # scan on CPU (compiles fast); unrolled on accelerators: on a GPU a while loop over
            # layers costs a host round trip per iteration (H100, Llama-3.2-1B, 3 decodes: 2.9 vs 1.7 ms/step)
            self.scan_layers = self.platform == "cpu"
        t0 = time.perf_counter()
        if cfg.load_format == "random":
            self.params = llama_jax.random_params(self.arch, self.dtype, self.device, seed=cfg.seed)
        else:
            if not llama_jax.has_checkpoint(model_dir):
                raise ValueError(f"model: no *.safetensors in {model_dir} (use load_format='random' for random weights)")
            self.params = llama_jax.load_params(self.arch, model_dir, self.dtype, self.device)
        if not self.scan_layers:  # per-layer arrays: no slicing of the stacked weights in the step
            stacked = self.params["layers"]
            self.params["layers"] = [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(self.arch.num_layers)]
            del stacked
        jax.block_until_ready(self.params)
        self.load_s = time.perf_counter() - t0

        a = self.arch
        self.max_model_len = min(cfg.max_model_len or a.max_position_embeddings, a.max_position_embeddings)
        self.bs = cfg.block_size
        self.max_blocks = math.ceil(self.max_model_len / self.bs)
        self.min_p_bucket = min(_pow2_at_least(MIN_BLOCK_TOKENS // self.bs), self.max_blocks)
        self.num_rows = cfg.max_num_seqs  # live requests at most; row num_rows is scratch
        self.num_blocks = cfg.num_kv_blocks or self._blocks_from_memory()
        kv_shape = (self.num_blocks + 1, self.bs, 2 * a.num_kv_heads, a.head_dim)  # +1: the scratch block
        with jax.default_device(self.device):
            if self.scan_layers:
                self.kv: Any = jnp.zeros((a.num_layers, *kv_shape), self.dtype)
            else:
                self.kv = tuple(jnp.zeros(kv_shape, self.dtype) for _ in range(a.num_layers))
            self.tokbuf = jnp.zeros((self.num_rows + 1, self.max_model_len), jnp.int32)
        # Committed to the device: arrays made under default_device are not, and a program
        # lowered with uncommitted ones is compiled for JAX's default device instead.
        self.kv, self.tokbuf = jax.device_put((self.kv, self.tokbuf), self.device)
        self.free_rows = list(range(self.num_rows - 1, -1, -1))
        # max_num_batched_tokens is a bucket itself when it is not a power of two.
        self.max_tokens_bucket = cfg.max_num_batched_tokens
        self.max_req_bucket = max(MIN_REQ_BUCKET, _pow2_at_least(cfg.max_num_seqs))
        self._step_jit = jax.jit(_step_fn, donate_argnums=(1, 2), static_argnames=("shape", "arch", "attention", "scan_layers"))
        self._base_key = (a, self.dtype_name, self.num_blocks, self.bs, self.num_rows, self.max_model_len, self.scan_layers,
                          self.attn_name, str(self.device))
        log.info("jax runner: %s on %s (%s), %d KV blocks of %d, attention %s, scan_layers=%s, weights loaded in %.1fs",
                 a.arch, self.device, self.dtype_name, self.num_blocks, self.bs, self.attn_name, self.scan_layers, self.load_s)
        pre = os.environ.get("AIOSCHED_JAX_PRECOMPILE", "")
        if pre not in ("", "0"):
            limits = dict(kv.split("=", 1) for kv in pre.split(",") if "=" in kv)
            self.precompile(self.all_shapes(max_reqs=int(limits.get("reqs", 0)) or None, max_len=int(limits.get("len", 0)) or None))
        return WorkerInfo(PROTOCOL_VERSION, self.num_blocks, self.bs, a.vocab_size, self.max_model_len,
                          f"jax:{self.platform}:{self.device.id}", self.dtype_name, "jax",
                          features=["logprobs", "prompt_logprobs", "penalties"])

    def _kv_bytes_per_block(self) -> int:
        a = self.arch
        return a.num_layers * self.bs * 2 * a.num_kv_heads * a.head_dim * jnp.dtype(self.dtype).itemsize

    def _blocks_from_memory(self) -> int:
        per = self._kv_bytes_per_block()
        if self.platform == "cpu":
            budget = self.config.kv_cache_memory_gb * (1 << 30)
        else:
            stats = self.device.memory_stats() or {}
            limit = stats.get("bytes_limit")
            if not limit:
                raise ValueError("num_kv_blocks: cannot read the device memory limit; set num_kv_blocks")
            # leave room for activations: 10% of the limit on top of what is in use
            budget = limit * self.config.gpu_memory_utilization - stats.get("bytes_in_use", 0) - 0.1 * limit
        n = int(budget // per)
        if n < 1:
            raise ValueError(f"num_kv_blocks: no memory left for the KV cache ({budget / 2**30:.2f} GiB budget)")
        return n

    # ---------------------------------------------------------------- buckets

    def _shape(self, n_tokens: int, n_reqs: int, max_blocks: int, decode_only: bool, max_bias: int, sampling: int = 0) -> Shape:
        R = _bucket(n_reqs, MIN_REQ_BUCKET, self.max_req_bucket)
        P = _bucket(max_blocks, self.min_p_bucket, self.max_blocks)
        M = _pow2_at_least(max_bias, MIN_BIAS_SLOTS)
        if decode_only:
            return Shape(T=R, R=R, NT=R, Qt=1, P=P, M=M, sampling=sampling)
        T = _bucket(n_tokens, MIN_TOKEN_BUCKET, self.max_tokens_bucket)
        Qt = self.tile_size
        return Shape(T=T, R=R, NT=-(-T // Qt) + R, Qt=Qt, P=P, M=M, sampling=sampling)

    def all_shapes(self, max_reqs: int | None = None, max_len: int | None = None) -> list[Shape]:
        """Every bucket this config can reach (bias slots at the minimum, greedy sampling),
        or only those of batches of at most `max_reqs` requests of at most `max_len` tokens.
        Other sampling variants compile on first use."""
        def ladder(lo: int, hi: int) -> list[int]:
            out, x = [], lo
            while x < hi:
                out.append(x)
                x *= 2
            return out + [hi]

        Rs = ladder(MIN_REQ_BUCKET, self.max_req_bucket)
        Ps = ladder(self.min_p_bucket, self.max_blocks)
        if max_reqs:
            Rs = [r for r in Rs if r <= _bucket(max_reqs, MIN_REQ_BUCKET, self.max_req_bucket)]
        if max_len:
            Ps = [p for p in Ps if p <= _bucket(-(-max_len // self.bs), self.min_p_bucket, self.max_blocks)]
        Ts = ladder(MIN_TOKEN_BUCKET, self.max_tokens_bucket)
        shapes = set()
        for R in Rs:
            for P in Ps:
                if R <= max(MIN_REQ_BUCKET, self.config.max_num_batched_tokens):
                    shapes.add(self._shape(R, R, P, True, 0))
                for T in Ts:
                    if R == MIN_REQ_BUCKET or R // 2 < T:  # every request has a token
                        shapes.add(Shape(T, R, -(-T // self.tile_size) + R, self.tile_size, P, MIN_BIAS_SLOTS))
        return sorted(shapes)

    def precompile(self, shapes: list[Shape] | None = None, workers: int | None = None) -> dict[str, Any]:
        """Compile step programs ahead of time from shapes alone (no execution), on
        `workers` threads (XLA compiles outside the GIL; default: one per CPU core)."""
        t0 = time.perf_counter()
        shapes = shapes if shapes is not None else self.all_shapes()
        workers = workers or min(len(shapes), os.cpu_count() or 1) or 1
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="jax-compile") as pool:
                list(pool.map(self._program, shapes))
        else:
            for s in shapes:
                self._program(s)
        wall = time.perf_counter() - t0
        with _PROGRAMS_LOCK:
            _STATS["precompile_wall_s"] += wall
            _STATS["precompile_threads"] = max(_STATS["precompile_threads"], workers)
        log.info("jax: precompiled %d step shapes in %.1fs wall", len(shapes), wall)
        return compile_stats()

    def _program(self, shape: Shape) -> Any:
        ints = jax.ShapeDtypeStruct((shape.n_int,), jnp.int32, sharding=self.sharding)
        floats = jax.ShapeDtypeStruct((shape.n_float,), jnp.float32, sharding=self.sharding)
        key = (*self._base_key, _compiler_options() is not None, "step", shape)
        lower = functools.partial(self._step_jit.lower, self.params, self.kv, self.tokbuf, ints, floats, shape=shape, arch=self.arch,
                                  attention=self.attention, scan_layers=self.scan_layers)
        prog = self._progs[shape] = _compiled(key, "step", lower)
        return prog

    # ---------------------------------------------------------------- execute

    def execute(self, so: SchedulerOutput) -> PendingOutput:
        t0 = time.perf_counter()
        pending = self._execute(so)
        self.host_s += time.perf_counter() - t0
        return pending

    def _execute(self, so: SchedulerOutput) -> PendingOutput:
        for rid in so.freed_req_ids:
            st = self.reqs.pop(rid, None)
            if st is not None:
                self.free_rows.append(st.row)
        if so.new_requests:
            self._add_requests(so.new_requests)
        if so.is_empty:
            return ReadyOutput(RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[]))

        sched = so.scheduled
        n_tokens = 0
        max_blocks = 1
        max_bias = 0
        sampling = 0
        decode_only = True
        for sr in sched:
            if sr.draft_token_ids or sr.num_draft_slots:
                raise NotImplementedError("speculative decoding: not supported by the JAX runner")
            st = self.reqs[sr.req_id]
            if sr.new_block_ids:
                st.blocks.extend(sr.new_block_ids)
            end = sr.num_computed_tokens + sr.num_tokens
            if len(st.blocks) * self.bs < end:
                raise RuntimeError(f"{sr.req_id}: {len(st.blocks)} blocks cannot hold {end} tokens")
            n_tokens += sr.num_tokens
            max_blocks = max(max_blocks, -(-end // self.bs))
            decode_only = decode_only and sr.num_tokens == 1
            if sr.sample:
                max_bias = max(max_bias, len(st.bias) + len(st.masked))
                sampling |= st.sampling_bits
            if st.sampling.prompt_logprobs is not None and sr.num_computed_tokens + 1 < st.prompt_len:
                sampling |= PROMPT_LOGPROBS
        shape = self._shape(n_tokens, len(sched), max_blocks, decode_only, max_bias, sampling)
        hb = _HostBatch(shape, self._templates, self.num_blocks, self.num_rows)
        i, f = hb.i, hb.f
        bs, Qt = self.bs, shape.Qt
        t = 0  # flat token offset
        tile = 0
        s = 0  # sampled rows
        sampled_ids: list[str] = []
        lp_rows: list[tuple[int, int]] = []
        plp: list[tuple[str, int, int, int]] = []
        for r, sr in enumerate(sched):
            st = self.reqs[sr.req_id]
            n, start = sr.num_tokens, sr.num_computed_tokens
            end = start + n
            pos = np.arange(start, end, dtype=np.int32)
            blocks = np.asarray(st.blocks, dtype=np.int32)
            i["tok_row"][t:t + n] = st.row
            i["tok_pos"][t:t + n] = pos
            i["slot_block"][t:t + n] = blocks[pos // bs]
            i["slot_offset"][t:t + n] = pos % bs
            nb = min(len(blocks), shape.P)
            i["req_blocks"][r, :nb] = blocks[:nb]
            i["req_kv_len"][r] = end
            i["cu_q_len"][r + 1] = t + n
            for c in range(0, n, Qt):  # query tiles of this request
                m = min(Qt, n - c)
                i["tile_token"][tile, :m] = np.arange(t + c, t + c + m, dtype=np.int32)
                i["tile_pos"][tile, :m] = pos[c:c + m]
                i["tile_blocks"][tile, :nb] = blocks[:nb]
                i["token_row"][t + c:t + c + m] = np.arange(tile * Qt, tile * Qt + m, dtype=np.int32)
                tile += 1
            k = st.sampling.prompt_logprobs
            if k is not None and start + 1 < st.prompt_len:  # logprobs of prompt tokens start+1 .. min(end, prompt_len - 1)
                plp.append((sr.req_id, k, t, min(end + 1, st.prompt_len) - (start + 1)))
            t += n
            if sr.sample:
                sp = st.sampling
                i["logits_idx"][s] = t - 1
                i["samp_row"][s] = st.row
                i["samp_pos"][s] = end
                i["top_k"][s] = sp.top_k if sp.top_k > 0 else 0
                seed = st.seed & 0xFFFFFFFFFFFFFFFF
                i["seed_lo"][s] = np.uint32(seed & 0xFFFFFFFF).view(np.int32)
                i["seed_hi"][s] = np.uint32(seed >> 32).view(np.int32)
                f["temperature"][s] = sp.temperature
                f["top_p"][s] = sp.top_p
                f["min_p"][s] = sp.min_p
                f["presence"][s] = sp.presence_penalty
                f["frequency"][s] = sp.frequency_penalty
                f["repetition"][s] = sp.repetition_penalty
                i["prompt_len"][s] = st.prompt_len
                b = 0
                for tok, val in st.bias.items():
                    i["bias_ids"][s, b] = tok
                    f["bias_val"][s, b] = val
                    b += 1
                if end - st.prompt_len < sp.min_tokens:
                    for tok in st.masked:
                        i["bias_ids"][s, b] = tok
                        f["bias_val"][s, b] = -np.inf
                        b += 1
                if sp.logprobs is not None:
                    lp_rows.append((s, sp.logprobs))
                sampled_ids.append(sr.req_id)
                s += 1
        i["cu_q_len"][len(sched) + 1:] = t
        i["num_reqs"][0] = len(sched)
        prog = self._progs.get(shape) or self._program(shape)
        self.kv, self.tokbuf, toks, extras = prog(self.params, self.kv, self.tokbuf,
                                                    *jax.device_put((hb.ints, hb.floats), self.device))
        self.steps += 1
        self.tokens_computed += n_tokens
        return _JaxPending(so.step_id, sampled_ids, toks, extras, lp_rows, plp)

    def _add_requests(self, news: list[NewRequestData]) -> None:
        rows, cols, vals = [], [], []
        for new in news:
            if new.req_id in self.reqs:
                raise RuntimeError(f"{new.req_id}: sent as new but the worker already has it")
            if not self.free_rows:
                raise RuntimeError(f"more than max_num_seqs={self.num_rows} live requests on the worker")
            sp = new.sampling
            _check_sampling(sp)
            if len(new.token_ids) > self.max_model_len:
                raise RuntimeError(f"{new.req_id}: {len(new.token_ids)} tokens exceed max_model_len={self.max_model_len}")
            row = self.free_rows.pop()
            bias = {int(k): float(v) for k, v in sp.logit_bias.items()}
            for tok in sp.bad_token_ids:
                bias[int(tok)] = -math.inf
            bits = 0
            if sp.temperature > 0.0:
                bits |= SAMPLE_RANDOM
                if sp.top_k > 0 or sp.top_p < 1.0 or sp.min_p > 0.0:
                    bits |= SAMPLE_FILTERS
            if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0 or sp.repetition_penalty != 1.0:
                bits |= SAMPLE_PENALTIES
            if sp.logprobs is not None:
                bits |= SAMPLE_LOGPROBS
            self.reqs[new.req_id] = _Req(row=row, prompt_len=new.prompt_len, sampling=sp, seed=new.seed,
                                         masked=sorted(set(new.eos_token_ids) | set(sp.stop_token_ids)) if sp.min_tokens else [],
                                         bias=bias, sampling_bits=bits)
            n = len(new.token_ids)
            rows.append(np.full(n, row, np.int32))
            cols.append(np.arange(n, dtype=np.int32))
            vals.append(np.asarray(new.token_ids, np.int32))
        n = sum(len(v) for v in vals)
        K = _pow2_at_least(n, 64)
        r = np.full(K, self.num_rows, np.int32)
        c = np.zeros(K, np.int32)
        v = np.zeros(K, np.int32)
        r[:n], c[:n], v[:n] = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        key = (*self._base_key, _compiler_options() is not None, "write", K)
        spec = jax.ShapeDtypeStruct((K,), jnp.int32, sharding=self.sharding)
        prog = _compiled(key, "write", functools.partial(_write_tokens.lower, self.tokbuf, spec, spec, spec))
        self.tokbuf = prog(self.tokbuf, *jax.device_put((r, c, v), self.device))

    def shutdown(self) -> None:
        if self.steps:
            _RUNS.append({"async_scheduling": self.config.async_scheduling, "steps": self.steps,
                          "execute_ms_per_step": 1e3 * self.host_s / self.steps})
        for name in ("params", "kv", "tokbuf"):
            if hasattr(self, name):
                delattr(self, name)
        self.reqs.clear()

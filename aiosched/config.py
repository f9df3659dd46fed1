"""Engine configuration: one msgspec Struct, built from a dict, a TOML file or kwargs.

Everything that selects *where* work runs (executor, device, tensor parallelism,
remote address) is config, never code.
"""
from __future__ import annotations

import functools
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

# Value sets of the fields that take one of a few names: validate() and the CLI's choices
# both read these (executor is open: executors register themselves by name).
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
LOAD_FORMATS = ("auto", "random")
RUNNERS = ("torch", "jax", "fake")
FIELD_CHOICES: dict[str, tuple[str, ...]] = {"dtype": DTYPES, "load_format": LOAD_FORMATS, "runner": RUNNERS}


class SpeculativeConfig(msgspec.Struct, forbid_unknown_fields=True):
    method: str = "ngram"  # only 'ngram' (prompt lookup: drafts copied from the request's own history)
    num_tokens: int = 4  # draft tokens proposed per step
    ngram_min: int = 1  # shortest n-gram matched against the history
    ngram_max: int = 4  # longest n-gram matched against the history
    auto: bool = True  # measure throughput with and without drafts, keep drafting only while it is faster (stats: spec_auto)
    disable_by_batch_size: int = 0  # no drafts in a step while this many requests or more are running (0: no limit)

    def validate(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative.method: only 'ngram' is supported, got {self.method!r}")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"speculative.num_tokens must be in [1, 16], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"speculative.ngram_min/ngram_max must satisfy 1 <= min <= max, got {self.ngram_min}, {self.ngram_max}")
        if self.disable_by_batch_size < 0:
            raise ValueError(f"speculative.disable_by_batch_size must be >= 0, got {self.disable_by_batch_size}")


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Model
    model: str | None = None  # HF-layout directory; None = the embedded default model
    dtype: str = "auto"  # auto: on cuda the checkpoint's config.json dtype (a float32 checkpoint runs in bfloat16); on cpu float32. Aliases: half, float, bf16, fp16, fp32
    load_format: str = "auto"  # auto: safetensors from `model`; random: random weights of config.json's shape
    max_model_len: int | None = None  # None: from config.json (max_position_embeddings)
    # Where it runs
    executor: str = "inproc"  # inproc | multiproc | remote | ray (registry names)
    runner: str = "torch"  # torch | jax | fake (the worker-side model runner)
    device: str = "cpu"  # cpu | cuda | cuda:N
    tensor_parallel_size: int = 1  # ranks the model is sharded over (one worker per rank)
    remote_address: str | None = None  # tcp://host:port for executor = "remote"
    remote_server_key: str | None = None  # worker's public key file (CurveZMQ)
    remote_client_key: str | None = None  # our secret key file
    remote_insecure: bool = False  # allow plaintext ZeroMQ to the remote worker (trusted networks only)
    worker_timeout_s: float = 5.0  # a ready worker silent (or stopped) this long is declared dead
    worker_start_timeout_s: float = 600.0  # a worker not ready this long after start is declared dead (imports, loading)
    ray_address: str | None = None  # executor = "ray": the cluster to join ("auto", "ray://host:10001", host:port); None: the current one, else a new local one
    ray_placement: str = "pack"  # executor = "ray": pack the ranks on one node when they fit | spread them over nodes
    # Scheduling
    async_scheduling: bool = True  # schedule step N+1 while step N runs; false: the synchronous baseline
    max_num_seqs: int = 256  # most requests in one batch
    max_num_batched_tokens: int = 2048  # most tokens per step (prefill chunks + decodes)
    max_waiting_requests: int = 10_000  # beyond this queue length generate() raises EngineOverloadedError (HTTP 503)
    enable_prefix_caching: bool = True  # reuse the KV blocks of identical prompt prefixes
    stream_interval: int = 1  # a streamed output every N new tokens (the first and the last at once): less host work per token
    # KV cache
    block_size: int = 16  # tokens per KV cache block (a power of two)
    num_kv_blocks: int | None = None  # None: sized from memory (kv_cache_memory_gb on CPU)
    kv_cache_memory_gb: float = 1.0  # CPU budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.85  # fraction of GPU memory for weights + KV cache when num_kv_blocks is None
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: cores - 1, leaving one for the event loop
    # CUDA fast path
    enforce_eager: bool = False  # never use CUDA graphs
    cuda_graph_max_batch: int = 256  # largest decode batch captured in a CUDA graph
    # Misc
    seed: int = 0  # engine RNG: draws the seed of every request that sets none
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding; None: off
    # Logging
    log_requests: bool = False  # log each request's arrival and finish (logger aiosched.requests, INFO)
    log_stats_interval_s: float = 10.0  # throughput / queue / KV usage log line every N seconds while busy (logger aiosched.stats, INFO); 0: off

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        self.validate()

    def validate(self) -> None:
        pos_ints = ["tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "block_size", "cuda_graph_max_batch",
                    "stream_interval"]
        for name in pos_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_model_len", "num_kv_blocks", "cpu_threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or unset, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}), got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.kv_cache_memory_gb > 0.0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not self.worker_timeout_s > 0.0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if not self.worker_start_timeout_s > 0.0:
            raise ValueError(f"worker_start_timeout_s must be > 0, got {self.worker_start_timeout_s}")
        if self.ray_placement not in ("pack", "spread"):
            raise ValueError(f"ray_placement must be 'pack' or 'spread', got {self.ray_placement!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be 'auto' or 'random', got {self.load_format!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of torch, jax, fake, got {self.runner!r}")
        if not self.log_stats_interval_s >= 0.0:
            raise ValueError(f"log_stats_interval_s must be >= 0 (0: off), got {self.log_stats_interval_s}")
        if self.executor == "remote" and not self.remote_address:
            raise ValueError("remote_address is required when executor = 'remote'")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a path string, got {self.model!r}")
        if self.speculative is not None:
            self.speculative.validate()

    @property
    def max_concurrent_batches(self) -> int:
        """Batches in flight: 2 lets the scheduler run one step ahead."""
        return 2 if self.async_scheduling else 1

    @property
    def resolved_model(self) -> str | None:
        """The checkpoint dir: `model`, else the embedded default model if shipped."""
        if self.model is not None:
            return os.path.expanduser(self.model)
        default = Path(__file__).parent / "default_model"
        return str(default) if (default / "config.json").is_file() else None

    @property
    def resolved_dtype(self) -> str:
        """`dtype`, or for auto: float32 on cpu (torch's CPU kernels are fastest and exact
        there); on cuda the checkpoint's own half type, and bfloat16 for a float32 (or
        undeclared) checkpoint, as vLLM does."""
        if self.dtype != "auto":
            return self.dtype
        if self.device == "cpu":
            return "float32"
        declared = checkpoint_dtype(self.resolved_model)
        return declared if declared in ("bfloat16", "float16") else "bfloat16"

    def replace(self, **changes: Any) -> "EngineConfig":
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def load(cls, source: "EngineConfig | dict[str, Any] | str | os.PathLike[str] | None" = None, **overrides: Any) -> "EngineConfig":
        """Build from a config, a dict, or a TOML file path; `overrides` win."""
        if isinstance(source, EngineConfig):
            return source.replace(**overrides) if overrides else source
        if source is None:
            data: dict[str, Any] = {}
        elif isinstance(source, dict):
            data = dict(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"config file not found: {path}")
            with open(path, "rb") as f:
                data = tomllib.load(f)
            data = data.get("engine", data)  # allow an [engine] table
        data.update(overrides)
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid engine config: {e}") from None


_HF_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32", "float": "float32"}


@functools.lru_cache(maxsize=32)
def checkpoint_dtype(model_dir: str | None) -> str | None:
    """The dtype a checkpoint declares in config.json (`torch_dtype`, or `dtype` as
    transformers >= 4.56 writes it), normalised to our names; None if it declares none."""
    if model_dir is None:
        return None
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
    return _HF_DTYPES.get(str(value).removeprefix("torch.")) if value else None

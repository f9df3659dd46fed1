"""Start-up checks: refuse, in one line naming the setting, what would otherwise fail late.

`AsyncEngine.start()` runs `check_startup(config)` before it starts an executor, so the
library, `aiosched generate`, `chat` and `serve` all refuse the same things the same way
(a `ValueError` whose message starts with the field's name), instead of:
- a traceback from deep inside the loader (`model` missing or not a checkpoint dir),
- torch's `AssertionError: Torch not compiled with CUDA enabled` (`device` on CPU torch),
- a kill by the kernel's OOM killer with no message (a KV cache larger than free RAM),
- a silently shorter context (`max_model_len` above the model's position limit).

No torch import: this reads config.json, the safetensors headers, torch's version file
and /proc. The memory estimate mirrors how the CPU runners size the KV cache.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

from aiosched.config import EngineConfig

_GIB = 2**30
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_startup(config: EngineConfig) -> None:
    """Raise ValueError for a config this machine cannot run; return None if it can."""
    if config.executor == "remote":
        return  # the model, the device and the memory are the remote worker's
    hf = check_model_dir(config)
    if hf is None:
        return
    check_max_model_len(config, hf)
    if config.runner == "torch":
        check_torch_device(config)
    if config.runner in ("torch", "jax") and config.device == "cpu":
        check_memory(config, hf)


def check_model_dir(config: EngineConfig) -> dict[str, Any] | None:
    """The model's config.json as a dict (None when the runner needs no checkpoint)."""
    model = config.resolved_model
    if model is None:
        if config.runner == "fake":
            return None
        raise ValueError("model: no model given and no embedded default model is installed")
    path = Path(model)
    if not path.exists():
        raise ValueError(f"model: {model} does not exist (a local Hugging Face-layout directory with config.json is expected)")
    if not path.is_dir():
        raise ValueError(f"model: {model} is not a directory (a Hugging Face-layout directory with config.json is expected)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if config.runner == "fake":
            return None  # the fake runner needs only the tokenizer, if that
        raise ValueError(f"model: {model} has no config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"model: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model: {cfg_path} must hold a JSON object")
    return cfg


def check_max_model_len(config: EngineConfig, hf: dict[str, Any]) -> None:
    limit = hf.get("max_position_embeddings")
    if config.max_model_len is not None and isinstance(limit, int) and config.max_model_len > limit:
        raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's max_position_embeddings ({limit} in config.json); "
                         f"use at most {limit}")


def check_torch_device(config: EngineConfig) -> None:
    if not config.device.startswith("cuda"):
        return
    version = torch_build()
    if version is not None and version.get("cuda") is None and version.get("hip") is None:
        raise ValueError(f"device: {config.device!r} needs a CUDA build of torch, but the installed torch "
                         f"{version.get('__version__', '?')} is CPU-only (see README: 'CUDA build'); use --device cpu")


def torch_build() -> dict[str, Any] | None:
    """torch.version's fields (`__version__`, `cuda`, `hip`) without importing torch
    (seconds, and the multiproc engine process never needs it); None if unknown."""
    mod = sys.modules.get("torch.version")
    if mod is not None:
        return {k: getattr(mod, k, None) for k in ("__version__", "cuda", "hip")}
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    out: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            out[target.id] = value.value
    return out


# ---------------------------------------------------------------- memory


def check_memory(config: EngineConfig, hf: dict[str, Any]) -> None:
    """On CPU: the KV cache the runner will allocate, plus the weights, must fit in the
    memory available now (the KV cache is zero-filled at start, so every page is touched)."""
    available = available_memory()
    if available is None:
        return
    kv, setting = kv_cache_bytes(config, hf)
    weights = weight_bytes(config, hf)
    if kv + weights > available:
        raise ValueError(f"{setting}: the KV cache needs {kv / _GIB:.2f} GiB (plus {weights / _GIB:.2f} GiB of weights), but only "
                         f"{available / _GIB:.2f} GiB of memory is available; lower {setting}")


def _arch(hf: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """(layers, kv heads, head dim, hidden, intermediate, vocab) from config.json."""
    hidden = int(hf.get("hidden_size", 0))
    heads = int(hf.get("num_attention_heads", 1) or 1)
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or (hidden // heads if heads else 0))
    return (int(hf.get("num_hidden_layers", 0)), kv_heads, head_dim, hidden, int(hf.get("intermediate_size", 0)),
            int(hf.get("vocab_size", 0)))


def kv_cache_bytes(config: EngineConfig, hf: dict[str, Any]) -> tuple[int, str]:
    """(bytes, the setting that decides them), sized as the CPU runners size it: the
    blocks asked for, or the `kv_cache_memory_gb` budget (the torch runner caps it at
    what max_num_seqs full-length requests can use)."""
    layers, kv_heads, head_dim, *_ = _arch(hf)
    elem = _ELEM_BYTES[config.resolved_dtype]
    per_block = 2 * layers * config.block_size * kv_heads * head_dim * elem
    if per_block <= 0:
        return 0, "kv_cache_memory_gb"
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks * per_block, "num_kv_blocks"
    blocks = max(1, int(config.kv_cache_memory_gb * _GIB // per_block))
    if config.runner == "torch":
        max_len = config.max_model_len or int(hf.get("max_position_embeddings") or 0) or 1
        blocks = min(blocks, config.max_num_seqs * math.ceil(max_len / config.block_size) + 1)
    return blocks * per_block, "kv_cache_memory_gb"


def weight_bytes(config: EngineConfig, hf: dict[str, Any]) -> int:
    """The weights in the dtype they will run in: parameter counts from the safetensors
    headers (no tensor is read), or from config.json for random weights."""
    elem = _ELEM_BYTES[config.resolved_dtype]
    model = config.resolved_model
    if config.load_format != "random" and model is not None:
        files = sorted(Path(model).glob("*.safetensors"))
        if files:
            return sum(_safetensors_numel(f) for f in files) * elem
    layers, kv_heads, head_dim, hidden, inter, vocab = _arch(hf)
    heads = int(hf.get("num_attention_heads", 1) or 1)
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden * (1 if hf.get("tie_word_embeddings") else 2)
    return (layers * per_layer + embed + hidden) * elem


def _safetensors_numel(path: Path) -> int:
    """Elements in a safetensors file, from its JSON header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                return 0
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return 0
    return sum(math.prod(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup limit."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    limit = _cgroup_room()
    if limit is not None and (avail is None or limit < avail):
        avail = limit
    return avail


def _cgroup_room() -> int | None:
    """A cgroup's memory limit minus its usage (v2, then v1); None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


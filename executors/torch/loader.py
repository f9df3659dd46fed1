"""Load a local Hugging Face layout dir (config.json + safetensors) into our torch model.

Weights are read tensor by tensor (`safe_open`), converted to the target dtype and
copied straight into the parameters, including the fused q/k/v and gate/up matrices.
A tensor-parallel rank reads only its slice of each tensor (`get_slice`, so the rest
of the tensor is never read from disk); q, k, v, gate and up are each split on their
own before they land in this rank's rows of the fused matrix.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from aiosched.executors.model_config import IGNORED_TENSORS, ModelConfig
from aiosched.executors.model_registry import torch_model_class
from aiosched.executors.torch.models.llama import LlamaForCausalLM, ShardSpec, local_part_rows, shard_spec
from aiosched.executors.torch.parallel import TPGroup, shard_range

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            files = sorted({d / name for name in json.load(f)["weight_map"].values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"model: {index.name} in {d} lists shards that are missing: {', '.join(absent)}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors in {d} (use load_format='random' for random weights)")
    return files


def iter_tensors(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice handle) for every tensor in the checkpoint."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


# HF name -> (our parameter name, index of the part in a fused matrix or None)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
# One expert's matrix of a MoE layer (hub layout); our experts are stacked [E, ...] per layer
# (models/qwen3_moe.py), so it lands in slot e (gate / up: the first / second half of gate_up_proj).
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


def _expert_target(model: torch.nn.Module, m: re.Match[str]) -> tuple[str, tuple[int, int | None]] | None:
    layer, expert, proj = m.groups()
    ours, half = _EXPERT_PART[proj]
    path = f"layers.{layer}.mlp.experts.{ours}"
    try:
        param = model.get_parameter(path)
    except AttributeError:
        return None
    return (path, (int(expert), half)) if int(expert) < param.shape[0] else None


def _expert_slot(param: torch.Tensor, expert: int, half: int | None) -> torch.Tensor:
    """The [rows, cols] view of expert `expert` (and of its gate or up half) in a stacked parameter."""
    slot = param[expert]
    if half is None:
        return slot
    n = slot.shape[0] // 2
    return slot[half * n : (half + 1) * n]


_SKIP = ("skip", None)


def _target(model: LlamaForCausalLM, name: str) -> tuple[str, int | None] | None:
    """Our parameter an HF tensor goes into, and its part index if it is part of a fused
    matrix; `_SKIP` for a tensor that is knowingly not loaded; None: no parameter takes it."""
    if IGNORED_TENSORS.search(name):
        return _SKIP
    if name == "lm_head.weight" and model.lm_head is None:
        return _SKIP  # tied: the embedding serves as the head (some tied checkpoints still save a copy)
    if e := _EXPERT.match(name):
        return _expert_target(model, e)  # type: ignore[return-value]
    m = _LAYER.match(name)
    if m:
        layer, block, proj, kind = m.groups()
        ours, part = _FUSED.get(proj, (proj, None))
        path = f"layers.{layer}.{block}.{ours}.{kind}"
    elif name.startswith("model."):
        path, part = name[len("model.") :], None
    else:
        path, part = name, None
    try:
        model.get_parameter(path)
    except AttributeError:
        return None
    return path, part


def _take(t: Any, dim: int, size: int, tp: TPGroup, name: str) -> Any:
    """This rank's slice along `dim` of a tensor or a safetensors slice handle (same indexing)."""
    rows = shard_range(size, tp.rank, tp.world_size, name)
    return t[rows] if dim == 0 else t[:, rows]


def _read_shard(handle: Any, spec: ShardSpec, tp: TPGroup, name: str, fused_in_checkpoint: bool) -> torch.Tensor:
    """This rank's slice of one checkpoint tensor; only that slice is read (safetensors get_slice)."""
    if not tp.active or spec.dim is None:
        return handle[:]
    if fused_in_checkpoint:  # e.g. Phi-3's qkv_proj: split into q, k, v before sharding each
        return _shard_of_full(handle[:], spec, tp, name)
    return _take(handle, spec.dim, handle.get_shape()[spec.dim], tp, name)


def load_weights(model: LlamaForCausalLM, model_dir: str | os.PathLike[str]) -> None:
    """Copy every checkpoint tensor (this rank's shard of it) into the model; raise on a
    parameter left unset and on a checkpoint tensor that no parameter takes (dropping it
    would run a different model than the checkpoint's: issue 16)."""
    loaded: set[int] = set()
    written: dict[int, int] = {}  # elements written per parameter: a fused or stacked one is complete only when all are
    for name, handle in iter_tensors(model_dir):
        tgt = _target(model, name)
        if tgt is None:
            raise ValueError(f"checkpoint {model_dir}: tensor {name} matches no parameter of {model.args.arch} "
                             "(an unsupported variant of the architecture?)")
        if tgt is _SKIP:
            continue
        path, part = tgt
        param, spec = model.get_parameter(path), shard_spec(model.args, path)
        if isinstance(part, tuple):  # one expert's matrix (the MoE models refuse tensor parallelism)
            tensor, dst = handle[:], _expert_slot(param, *part)
        else:
            rows = None if part is None else local_part_rows(spec, part, model.tp.world_size)
            tensor = _read_shard(handle, spec, model.tp, name, fused_in_checkpoint=part is None and bool(spec.parts))
            dst = param if rows is None else param[rows]
        with torch.no_grad():
            if dst.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor.to(param.dtype))
        loaded.add(id(param))
        written[id(param)] = written.get(id(param), 0) + dst.numel()
    if model.lm_head is not None and id(model.lm_head.weight) not in loaded and id(model.embed_tokens.weight) in loaded:
        # No lm_head.weight in the checkpoint although config.json does not say tied:
        # such checkpoints tie implicitly, so the embedding serves as the head.
        model.lm_head = None
    missing = [n for n, p in model.named_parameters() if written.get(id(p), 0) < p.numel()]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _shard_of_full(full: torch.Tensor, spec: ShardSpec, tp: TPGroup, name: str) -> torch.Tensor:
    """This rank's shard of a full (unsharded) parameter, fused parts split one by one."""
    if spec.dim is None:
        return full
    parts = full.split(list(spec.parts)) if spec.parts else [full]
    return torch.cat([_take(p, spec.dim, p.shape[spec.dim], tp, name) for p in parts], dim=spec.dim)


def init_random_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights on the model's device (benchmarks without a checkpoint).

    Under tensor parallelism every rank draws each full tensor from the shared seed,
    in the same order, and keeps its shard: the sharded model equals the unsharded one."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    tp = model.tp
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(0.0 if model.args.norm_unit_offset else 1.0)  # an identity norm either way
            elif not tp.active:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                spec = shard_spec(model.args, name)
                shape = list(p.shape)
                if spec.dim is not None:
                    shape[spec.dim] *= tp.world_size
                full = torch.empty(shape, dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=gen)
                p.copy_(_shard_of_full(full, spec, tp, name))


def build_model(model_dir: str, dtype: str, device: str, load_format: str = "auto", seed: int = 0,
                rank: int = 0, world_size: int = 1) -> LlamaForCausalLM:
    """The model (this rank's shard of it when world_size > 1; no process group is needed to build it)."""
    args = ModelConfig.from_dir(model_dir)
    cls = torch_model_class(args.arch)
    torch_dtype = _DTYPES[dtype]
    with torch.device(device):
        model = cls(args, TPGroup(rank, world_size)).to(torch_dtype)
    if load_format == "random":
        init_random_weights(model, seed)
    else:
        load_weights(model, model_dir)
    return model.eval()

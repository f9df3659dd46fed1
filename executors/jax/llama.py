"""Llama-family decoder in JAX: Llama (llama3 rope scaling), Qwen2 (qkv bias), Qwen3 (q/k norm),
Phi-3 (fused checkpoint weights, a window on every layer), Gemma 2 / 3 ((1 + w) sandwich
norms, GeGLU, soft-capping, per-layer sliding windows, Gemma 3's local rope table),
Qwen3-MoE (top-k routing, grouped experts through `lax.ragged_dot`; every layer sparse).

Pure functions over a params pytree, so the runner can `jax.jit` one step program per
bucketed shape. Loads HF-layout checkpoints (config.json + *.safetensors) without torch:
safetensors files are read with a small header parser and `np.memmap`, so bfloat16
tensors work (numpy has no bf16; `ml_dtypes`, a jax dependency, provides it).

Layout choices:
- Linear weights are stored [in, out] (x @ W); q/k/v are fused into one matrix and
  gate/up into another (one GEMM each instead of three and two).
- Layer weights are stacked on a leading axis [L, ...]. With `scan_layers=True` (the
  runner's default on CPU) the layers run under `lax.scan` (compile time independent of
  depth) and the KV cache is
  one array [L, num_blocks, block_size, 2 * kv_heads, head_dim] carried through the
  scan and updated in place. With `scan_layers=False` the layers are unrolled, the
  cache is a tuple of per-layer arrays (what a per-layer Pallas kernel needs on TPU)
  and the runner passes the layer weights as a list of per-layer dicts (the default on
  GPU and TPU: a while loop on a GPU costs a host round trip per iteration).
- K and V heads are interleaved on the head axis (K at even, V at odd indices), the
  layout of the Pallas TPU ragged paged attention kernel, so the same cache serves both
  attention implementations.
"""
from __future__ import annotations

import functools

import glob
import json
import math
import os
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from aiosched.executors.jax import paged_attention as jax_paged
from aiosched.executors.model_config import IGNORED_TENSORS, SLIDING, ModelConfig, RopeConfig, read_config_json
from aiosched.executors.model_registry import check_jax_supported

Params = dict[str, Any]


class LlamaArch(ModelConfig):
    """What the forward pass needs from config.json: the shared `ModelConfig` (one parser
    for torch and JAX), for the architectures the JAX runner implements."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        mc = ModelConfig.from_hf(cfg)
        check_jax_supported(mc.arch)
        if mc.moe_layers and not all(mc.moe_layers):  # scanned layers share one parameter layout
            raise ValueError(f"config.json: mlp_only_layers / decoder_sparse_step (dense layers among the MoE layers) "
                             f"is not supported by the jax runner for {mc.arch}")
        return mc

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:  # type: ignore[override]
        return cls.from_hf_config(read_config_json(model_dir))


def rope_inv_freq(arch: ModelConfig, rope: RopeConfig | None = None) -> np.ndarray:
    """Inverse frequencies, float32, computed the way transformers computes them (of `rope`,
    default the model's main one; Gemma 3's sliding layers have their own)."""
    d, r = arch.head_dim, rope or arch.rope
    inv = (1.0 / (np.float32(r.theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)))).astype(np.float32)
    if r.kind == "default":
        return inv
    factor = np.float32(r.factor)
    if r.kind == "linear":
        return (inv / factor).astype(np.float32)
    # llama3: long wavelengths scaled by `factor`, short kept, a smooth ramp between.
    low, high = np.float32(r.low_freq_factor), np.float32(r.high_freq_factor)
    old = np.float32(r.original_max_position_embeddings)
    low_wl, high_wl = old / low, old / high
    wavelen = np.float32(2 * math.pi) / inv
    inv_l = np.where(wavelen > low_wl, inv / factor, inv).astype(np.float32)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


# ---------------------------------------------------------------------------
# Checkpoint loading (no torch)
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file (bf16 as ml_dtypes.bfloat16)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(meta["dtype"])
        if dt is None:
            raise ValueError(f"model: {path}: tensor {name} has unsupported dtype {meta['dtype']}")
        a, b = meta["data_offsets"]
        out[name] = mm[base + a: base + b].view(dt).reshape(meta["shape"])
    return out


def _checkpoint_tensors(model_dir: str) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    tensors: dict[str, np.ndarray] = {}
    for p in files:
        tensors.update(read_safetensors(p))
    return tensors


def has_checkpoint(model_dir: str) -> bool:
    return bool(glob.glob(os.path.join(model_dir, "*.safetensors")))


def load_params(arch: LlamaArch, model_dir: str, dtype: Any, device: Any) -> Params:
    """HF names -> the stacked, fused, [in, out] layout, placed on `device` in `dtype`."""
    t = _checkpoint_tensors(model_dir)
    if not t:
        raise ValueError(f"model: no *.safetensors files in {model_dir}")
    for k in list(t):  # some checkpoints drop the "model." prefix
        if not k.startswith("model.") and not k.startswith("lm_head."):
            t["model." + k] = t.pop(k)
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise ValueError(f"model: tensor {name} missing from the checkpoint in {model_dir}")
        used.add(name)
        return np.asarray(t[name], dtype=np.float32)

    def put(x: np.ndarray) -> jax.Array:
        return jax.device_put(jnp.asarray(x, dtype=dtype), device)

    L = arch.num_layers
    layers: dict[str, list[np.ndarray]] = {}

    def add(key: str, x: np.ndarray) -> None:
        layers.setdefault(key, []).append(x)

    for i in range(L):
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in t:  # fused in the checkpoint (Phi-3): [q; k; v] rows
            add("wqkv", get(p + "self_attn.qkv_proj.weight").T)
        else:
            q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            add("wqkv", np.concatenate([q, k, v], axis=0).T)
        add("wo", get(p + "self_attn.o_proj.weight").T)
        if arch.qkv_bias:
            add("bqkv", np.concatenate([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
        if arch.o_bias:
            add("bo", get(p + "self_attn.o_proj.bias"))
        if arch.qk_norm:
            add("q_norm", get(p + "self_attn.q_norm.weight"))
            add("k_norm", get(p + "self_attn.k_norm.weight"))
        if arch.moe_layers and arch.moe_layers[i]:  # Qwen3-MoE: router + stacked experts, [E, in, out]
            add("router", get(p + "mlp.gate.weight").T)
            gu, down = _expert_weights(get, t, p + "mlp.experts.", arch.num_experts)
            add("we_gu", gu.transpose(0, 2, 1))
            add("we_d", down.transpose(0, 2, 1))
        elif p + "mlp.gate_up_proj.weight" in t:  # fused in the checkpoint (Phi-3): [gate; up] rows
            add("wgu", get(p + "mlp.gate_up_proj.weight").T)
        else:
            add("wgu", np.concatenate([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], axis=0).T)
        if not (arch.moe_layers and arch.moe_layers[i]):
            add("wd", get(p + "mlp.down_proj.weight").T)
        if arch.mlp_bias:
            add("bgu", np.concatenate([get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")]))
            add("bd", get(p + "mlp.down_proj.bias"))
        add("in_norm", get(p + "input_layernorm.weight"))
        add("post_norm", get(p + "post_attention_layernorm.weight"))
        if arch.sandwich_norm:  # Gemma: post_norm norms the attention output; the MLP has its own pre/post norms
            add("pre_ff_norm", get(p + "pre_feedforward_layernorm.weight"))
            add("post_ff_norm", get(p + "post_feedforward_layernorm.weight"))
    params: Params = {
        "embed": put(get("model.embed_tokens.weight")),
        "norm": put(get("model.norm.weight")),
        "layers": {k: put(np.stack(v)) for k, v in layers.items()},
    }
    if not arch.tie_word_embeddings and "lm_head.weight" in t:
        params["lm_head"] = put(get("lm_head.weight").T)
    # As the torch loader: a tensor we would drop is an error (tied heads and rotary caches excepted).
    unused = sorted(k for k in t if k not in used and k != "lm_head.weight" and not IGNORED_TENSORS.search(k))
    if unused:
        raise ValueError(f"checkpoint {model_dir}: tensor {unused[0]} matches no parameter of {arch.arch}"
                         + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
    return params


def _expert_weights(get: Callable[[str], np.ndarray], t: dict[str, np.ndarray], prefix: str,
                    num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(gate_up [E, 2I, H], down [E, H, I]) from the stacked layout (transformers >= 5) or the
    hub's one matrix per expert."""
    if prefix + "gate_up_proj" in t:
        return get(prefix + "gate_up_proj"), get(prefix + "down_proj")
    gu = np.stack([np.concatenate([get(f"{prefix}{e}.gate_proj.weight"), get(f"{prefix}{e}.up_proj.weight")])
                   for e in range(num_experts)])
    return gu, np.stack([get(f"{prefix}{e}.down_proj.weight") for e in range(num_experts)])


def random_params(arch: LlamaArch, dtype: Any, device: Any, seed: int = 0, std: float = 0.02) -> Params:
    """Random weights made on the device (no checkpoint): for benchmarks of a model shape."""
    L, H, I, D = arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wqkv": (L, H, arch.qkv_out), "wo": (L, arch.num_heads * D, H),
    }
    if arch.moe_layers:  # every layer sparse (LlamaArch refuses a mix)
        E, MI = arch.num_experts, arch.moe_intermediate_size
        shapes.update(router=(L, H, E), we_gu=(L, E, H, 2 * MI), we_d=(L, E, MI, H))
    else:
        shapes.update(wgu=(L, H, 2 * I), wd=(L, I, H))
    if arch.qkv_bias:
        shapes["bqkv"] = (L, arch.qkv_out)
    if arch.o_bias:
        shapes["bo"] = (L, H)
    if arch.mlp_bias:
        shapes["bgu"], shapes["bd"] = (L, 2 * I), (L, H)
    ones = {"in_norm": (L, H), "post_norm": (L, H)}
    if arch.qk_norm:
        ones.update(q_norm=(L, D), k_norm=(L, D))
    if arch.sandwich_norm:
        ones.update(pre_ff_norm=(L, H), post_ff_norm=(L, H))
    identity = jnp.zeros if arch.norm_unit_offset else jnp.ones  # an identity norm either way

    @jax.jit
    def make(key: jax.Array) -> Params:
        keys = jax.random.split(key, len(shapes) + 2)
        layers = {n: (std * jax.random.normal(k, s, jnp.float32)).astype(dtype) for (n, s), k in zip(shapes.items(), keys)}
        layers.update({n: identity(s, dtype) for n, s in ones.items()})
        p: Params = {"embed": (std * jax.random.normal(keys[-2], (arch.vocab_size, H), jnp.float32)).astype(dtype),
                     "norm": identity((H,), dtype), "layers": layers}
        if not arch.tie_word_embeddings:
            p["lm_head"] = (std * jax.random.normal(keys[-1], (H, arch.vocab_size), jnp.float32)).astype(dtype)
        return p

    with jax.default_device(device):
        return make(jax.random.key(seed))


def params_nbytes(params: Params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def rms_norm(x: jax.Array, w: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale. unit_offset
    (Gemma): scale by (1 + w) in float32, then cast."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * xf.astype(x.dtype)


_ACT = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu": functools.partial(jax.nn.gelu, approximate=False)}
_NO_WINDOW = 1 << 30


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rope (HF layout); x [T, heads, D], cos/sin [T, D/2] float32."""
    half = x.shape[-1] // 2
    c = jnp.concatenate([cos, cos], axis=-1)[:, None, :].astype(x.dtype)
    s = jnp.concatenate([sin, sin], axis=-1)[:, None, :].astype(x.dtype)
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * c + rot * s


def _moe(x: jax.Array, lp: Params, arch: LlamaArch, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Qwen3-MoE block: softmax (float32) top-k routing, optionally renormalised; the (token, k)
    pairs sorted by expert and run as grouped matmuls (`lax.ragged_dot`: static shapes, each
    expert's rows against its own matrices); each token's terms summed with their weights."""
    T, K, E = x.shape[0], arch.num_experts_per_tok, arch.num_experts
    probs = jax.nn.softmax((x @ lp["router"]).astype(jnp.float32), axis=-1)
    w, ids = jax.lax.top_k(probs, K)
    if arch.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // K
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    gu = jax.lax.ragged_dot(x[token], lp["we_gu"], sizes)  # [T*K, 2I]
    g, u = jnp.split(gu, 2, axis=-1)
    out = jax.lax.ragged_dot(act(g) * u, lp["we_d"], sizes)  # [T*K, H]
    out = out * w.astype(x.dtype).reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(out)


def forward(
    params: Params,
    kv_cache: Any,
    token_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    meta: jax_paged.AttentionMetadata,
    logits_indices: jax.Array,  # [S] int32: rows of the flat batch to compute logits for
    *,
    arch: LlamaArch,
    attention: Callable[..., jax.Array],
    scan_layers: bool,
    all_logits: bool = False,
) -> tuple[jax.Array, Any]:
    """One ragged step: write this step's K/V into the paged cache, attend, return
    float32 logits [S, vocab] for the requested rows and the updated cache; with
    `all_logits`, logits [T, vocab] of every row instead (prompt logprobs)."""
    Hq, Hkv, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
    T, L = token_ids.shape[0], arch.num_layers
    eps, uo = arch.rms_norm_eps, arch.norm_unit_offset

    def cos_sin(rope: RopeConfig | None) -> tuple[jax.Array, jax.Array]:
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(arch, rope))[None, :]
        return jnp.cos(freqs), jnp.sin(freqs)

    cos, sin = cos_sin(None)
    # Per-layer variants, indexed by the layer number (traced under scan): Gemma's sliding
    # window (full layers get a window no sequence reaches) and Gemma 3's local rope table.
    local = [arch.rope_local is not None and bool(arch.layer_types) and arch.layer_types[i] == SLIDING for i in range(L)]
    local_rope = cos_sin(arch.rope_local) if any(local) else None
    is_local = jnp.asarray(local)
    windows = [arch.window_of(i) for i in range(L)]
    window_of = jnp.asarray([_NO_WINDOW if w is None else w for w in windows], dtype=jnp.int32)
    attn_kw: dict[str, Any] = {}
    if arch.attn_logit_softcap is not None:
        attn_kw["softcap"] = arch.attn_logit_softcap
    scale = arch.attn_scale
    act = _ACT[arch.hidden_act]
    h = params["embed"][token_ids]
    if arch.embed_scale is not None:  # Gemma: the constant rounded to the model's dtype, as HF does
        h = h * jnp.asarray(arch.embed_scale, jnp.float32).astype(h.dtype)

    def layer(h: jax.Array, lp: Params, cache: jax.Array, li: Any, idx: Any) -> tuple[jax.Array, jax.Array]:
        x = rms_norm(h, lp["in_norm"], eps, uo)
        qkv = x @ lp["wqkv"]
        if "bqkv" in lp:
            qkv = qkv + lp["bqkv"]
        q = qkv[:, : Hq * D].reshape(T, Hq, D)
        k = qkv[:, Hq * D: (Hq + Hkv) * D].reshape(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D)
        if "q_norm" in lp:
            q = rms_norm(q, lp["q_norm"], eps, uo)
            k = rms_norm(k, lp["k_norm"], eps, uo)
        c, s = cos, sin
        if local_rope is not None:
            c, s = jnp.where(is_local[idx], local_rope[0], cos), jnp.where(is_local[idx], local_rope[1], sin)
        q = apply_rope(q, c, s)
        k = apply_rope(k, c, s)
        cache = jax_paged.write_kv(cache, li, k, v, meta)
        kw = dict(attn_kw, window=window_of[idx]) if any(w is not None for w in windows) else attn_kw
        o = attention(q, cache, li, meta, scale=scale, **kw)
        o = o.reshape(T, Hq * D) @ lp["wo"]
        if "bo" in lp:
            o = o + lp["bo"]
        if arch.sandwich_norm:
            h = h + rms_norm(o, lp["post_norm"], eps, uo)
            x = rms_norm(h, lp["pre_ff_norm"], eps, uo)
        else:
            h = h + o
            x = rms_norm(h, lp["post_norm"], eps, uo)
        if "router" in lp:
            m = _moe(x, lp, arch, act)
        else:
            gu = x @ lp["wgu"]
            if "bgu" in lp:
                gu = gu + lp["bgu"]
            g, u = jnp.split(gu, 2, axis=-1)
            m = (act(g) * u) @ lp["wd"]
        if "bd" in lp:
            m = m + lp["bd"]
        if arch.sandwich_norm:
            m = rms_norm(m, lp["post_ff_norm"], eps, uo)
        return h + m, cache

    if scan_layers:
        def body(carry: tuple[jax.Array, jax.Array], xs: tuple[Params, jax.Array]) -> tuple[tuple[jax.Array, jax.Array], None]:
            h, cache = carry
            lp, li = xs
            return layer(h, lp, cache, li, li), None

        (h, kv_cache), _ = jax.lax.scan(body, (h, kv_cache), (params["layers"], jnp.arange(arch.num_layers, dtype=jnp.int32)))
    else:
        caches = list(kv_cache)
        for i in range(arch.num_layers):
            layers = params["layers"]
            lp = layers[i] if isinstance(layers, list) else jax.tree.map(lambda w: w[i], layers)
            h, caches[i] = layer(h, lp, caches[i], None, i)
        kv_cache = tuple(caches)

    h = rms_norm(h if all_logits else h[logits_indices], params["norm"], eps, uo)
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    if arch.final_logit_softcap is not None:  # Gemma 2
        logits = jnp.tanh(logits / arch.final_logit_softcap) * arch.final_logit_softcap
    return logits, kv_cache

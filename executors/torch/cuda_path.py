"""The torch runner's step on CUDA: Triton kernels, persistent buffers, decode CUDA graphs.

`TorchModelRunner` hands its steps here when it runs on a CUDA device. Same model
weights, same KV cache tensors, same device token buffer and the same results as the
reference path (`executors/torch/attention/torch_paged.py` + the nn.Module forward), but:

- every step sends the device one packed int64 array through a ring of pinned host
  buffers (one H2D copy per step: per-token request rows and positions, per-request
  rows / lengths, attention tiles, sampling rows, block-table *deltas*); block tables
  live on the device, one row per request slot, and are never re-sent whole;
- input ids, positions, KV slots and context lengths are computed on the device from
  that array and the token buffer (no host round trip for tokens sampled last step);
- decode-only steps (one token per request, batch <= cuda_graph_max_batch) replay a
  CUDA graph captured per padded batch size: embedding, 16+ layers, LM head, greedy
  argmax and the write of the sampled token into the token buffer;
- other steps (prefill chunks, mixed batches, or enforce_eager) run the same fused
  forward eagerly with the varlen Triton attention (no per-request Python loop);
- non-greedy sampling (or banned tokens for min_tokens) falls back to the reference
  sampler on the step's logits, after the graph.

Padded graph rows use a scratch token-buffer row and position -1 (no KV write).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aiosched.protocol import RunnerOutput, SchedulerOutput
from aiosched.executors.torch import fused_ops
from aiosched.executors.torch.attention import triton_paged as tp
from aiosched.executors.torch.cuda_graphs import DecodeGraphs, capture_sizes
from aiosched.executors.runner import PendingOutput, ReadyOutput

log = logging.getLogger("aiosched")

_RING = 4  # pinned staging buffers in rotation (steps in flight are at most 2)


MIXED_MAX_TOKENS = 4096  # larger prefill steps run eagerly (device-bound there: launch overhead matters less)


def mixed_sizes(max_tokens: int) -> list[int]:
    """Padded token counts of the mixed-step graphs: 16, 32, 64, 128, then x1.5 / x2 steps
    (padding wastes < 50% of a small step, < 33% of a large one), capped at max_tokens."""
    sizes = [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    out = [t for t in sizes if t < max_tokens]
    if max_tokens >= 16:
        out.append(max_tokens)
    return out


def _write_token_rows(buf: np.ndarray, stride: int, states: list[Any], starts: list[int], qlens: list[int]) -> None:
    """Per query token: its request's buffer row at buf[t], its position at buf[stride + t]."""
    t = 0
    for st, start, n in zip(states, starts, qlens):
        buf[t:t + n] = st.row
        buf[stride + t:stride + t + n] = np.arange(start, start + n)
        t += n


class _Staging:
    """A ring of pinned int64 host buffers, each reused only after its H2D copy finished."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = [torch.zeros(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(_RING)]
        self.np = [h.numpy() for h in self.host]
        self.events: list[Any] = [None] * _RING
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.i = 0
        self.capacity = capacity

    def next(self) -> np.ndarray:
        self.i = (self.i + 1) % _RING
        ev = self.events[self.i]
        if ev is not None:
            ev.synchronize()
        return self.np[self.i]

    def upload(self, n: int) -> torch.Tensor:
        self.dev[:n].copy_(self.host[self.i][:n], non_blocking=True)
        if self.dev.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.events[self.i] = ev
        return self.dev


class CudaStepRunner:
    def __init__(self, runner: Any, use_graphs: bool | None = None) -> None:
        self.r = runner
        cfg = runner.config
        m = runner.model
        a = m.args
        self.m, self.a = m, a
        self.dev = runner.device
        self.bs = runner.block_size
        self.row_len = runner.row_len
        self.max_rows = cfg.max_num_seqs
        self.scratch_row = self.max_rows  # an extra token-buffer / block-table row for padding
        # One more row in the token buffer (scratch for padded graph rows).
        old = runner.tokens
        runner.tokens = torch.zeros((self.max_rows + 1, self.row_len), dtype=old.dtype, device=self.dev)
        runner.tokens[: old.shape[0]].copy_(old)
        self.max_blocks = math.ceil(self.row_len / self.bs)
        self.bt = torch.zeros((self.max_rows + 1, self.max_blocks), dtype=torch.int64, device=self.dev)
        self.max_tokens = max(cfg.max_num_batched_tokens, self.max_rows) + 64
        T, R = self.max_tokens, self.max_rows
        # decode layout [rows | pos | dst] at fixed offsets (the graphs read there), then the rest
        self.stage = _Staging(3 * R + 2 * T + 4 * R + 2 * (T + R) + 2 * R + 2 * (T + 2 * R) + 64, self.dev)
        self.scale = a.head_dim ** -0.5
        self.eps = a.rms_norm_eps
        self.lm_w = m.embed_tokens.weight if m.lm_head is None else m.lm_head.weight
        self.ws = tp.DecodeWorkspace(R, a.num_heads, a.head_dim, 16, self.dev)
        self.argmax_ws = fused_ops.argmax_workspace(max(R, T), a.vocab_size, self.dev)
        self.sampled = torch.zeros(R, dtype=torch.int64, device=self.dev)
        self.logits = torch.zeros((R, a.vocab_size), dtype=self.lm_w.dtype, device=self.dev)
        # Skinny (Triton) projections for 1-2 rows, where they beat cuBLAS on the H100
        # (benchmarks/decode_step.py --tune): o, gate_up, down, lm_head; qkv stays on cuBLAS.
        self.skinny = {"o": True, "gate_up": True, "down": True, "lm_head": True}
        self.graphs: DecodeGraphs | None = None
        if use_graphs is None:
            use_graphs = self.dev.type == "cuda" and not cfg.enforce_eager
        if use_graphs:
            max_bs = min(cfg.cuda_graph_max_batch, R)
            self.graphs = DecodeGraphs(self._graph_step, max_bs, self.dev, capture_sizes(max_bs))
            self._fill_padding(0, self.graphs.max_bs)
            with torch.inference_mode():
                self.graphs.capture()
        self.stats = {"graph_steps": 0, "eager_steps": 0, "mixed_graph_steps": 0}
        self.idle_probe: list[tuple[Any, Any]] | None = None  # (start, end) CUDA events per step while measuring
        # Prefill / mixed steps: graphs per padded token count (see _mixed_layout).
        self.mixed_bq = tp.varlen_block_q(a.num_heads, a.num_kv_heads, 2)
        self.mixed: DecodeGraphs | None = None
        self.mixed_padded_eager = False  # tests: run the padded mixed layout without graphs (no CUDA needed)
        if use_graphs:
            sizes = mixed_sizes(min(cfg.max_num_batched_tokens, MIXED_MAX_TOKENS))
            if sizes:
                self.mixed = DecodeGraphs(self._mixed_step, sizes[-1], self.dev, sizes, prepare=self._prepare_mixed, name="mixed-step")
                with torch.inference_mode():
                    self.mixed.capture()

    # ------------------------------------------------------------ the forward pass

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attend: Any) -> torch.Tensor:
        """Hidden states (final norm not applied) -> logits of the given rows, for ids [T]."""
        m, a = self.m, self.a
        T = ids.shape[0]
        sk = self.skinny if T <= fused_ops.SKINNY_PREFERRED_MAX_M else {}
        res = F.embedding(ids, m.embed_tokens.weight)
        pending: torch.Tensor | None = None
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            if pending is not None:
                h, _ = fused_ops.add_rms_norm(pending, res, layer.input_layernorm.weight, self.eps)
            else:
                h = fused_ops.rms_norm(res, layer.input_layernorm.weight, self.eps)
            qkv = F.linear(h, att.qkv_proj.weight, att.qkv_proj.bias)
            q = qkv[:, :q_size].view(T, a.num_heads, a.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(T, a.num_kv_heads, a.head_dim)
            v = qkv[:, q_size + kv_size:].view(T, a.num_kv_heads, a.head_dim)
            if att.q_norm is not None:
                q = fused_ops.rms_norm(q, att.q_norm.weight, self.eps)
                k = fused_ops.rms_norm(k, att.k_norm.weight, self.eps)
            kc, vc = self.r.kv_caches[i]
            fused_ops.rope_and_cache(q, k, v, pos, m.cos_sin, kc, vc, slots)
            o = attend(q, kc, vc)
            if sk.get("o"):
                fused_ops.skinny_linear(o.view(T, q_size), att.o_proj.weight, out=res, epilogue="residual")
                pending = None
            else:
                pending = F.linear(o.view(T, q_size), att.o_proj.weight)
            mlp = layer.mlp
            if sk.get("gate_up"):
                if pending is not None:
                    res.add_(pending)
                act = fused_ops.skinny_linear(res, mlp.gate_up_proj.weight, norm_weight=layer.post_attention_layernorm.weight,
                                              eps=self.eps, epilogue="silu_mul")
            else:
                if pending is not None:
                    h, _ = fused_ops.add_rms_norm(pending, res, layer.post_attention_layernorm.weight, self.eps)
                else:
                    h = fused_ops.rms_norm(res, layer.post_attention_layernorm.weight, self.eps)
                act = fused_ops.silu_and_mul(F.linear(h, mlp.gate_up_proj.weight))
            if sk.get("down"):
                fused_ops.skinny_linear(act, mlp.down_proj.weight, out=res, epilogue="residual")
                pending = None
            else:
                pending = F.linear(act, mlp.down_proj.weight)
        if pending is not None:
            res.add_(pending)
        return res

    def _logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head (one skinny kernel for few rows)."""
        n = hidden.shape[0]
        if n <= fused_ops.SKINNY_PREFERRED_MAX_M and self.skinny.get("lm_head"):
            return fused_ops.skinny_linear(hidden, self.lm_w, out=out, norm_weight=self.m.norm.weight, eps=self.eps)
        h = fused_ops.rms_norm(hidden, self.m.norm.weight, self.eps)
        y = F.linear(h, self.lm_w)
        return out.copy_(y) if out is not None else y

    # ------------------------------------------------------------ decode graph

    def _decode_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.stage.dev
        R = self.max_rows
        return d[:n], d[R:R + n], d[2 * R:2 * R + n]  # rows, positions (-1: padding), token-buffer write index

    def _graph_step(self, n: int) -> None:
        rows, pos, dst = self._decode_inputs(n)
        self._decode_body(n, rows, pos, dst)

    def _decode_body(self, n: int, rows: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> None:
        valid = pos >= 0
        p = pos.clamp(min=0)
        tokens = self.r.tokens.view(-1)
        ids = tokens[rows * self.row_len + p]
        slots = torch.where(valid, self.bt[rows, p // self.bs] * self.bs + p % self.bs, -1)
        seq = p + 1

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            return tp.paged_decode_attention(q, kc, vc, self.bt, seq, self.scale, workspace=self.ws, rows=rows)

        hidden = self._forward(ids, p, slots, attend)
        logits = self._logits(hidden, out=self.logits[:n])
        tok = fused_ops.argmax_rows(logits, out=self.sampled[:n], workspace=self.argmax_ws)
        tokens.index_copy_(0, dst, tok)

    def _fill_padding(self, start: int, end: int) -> None:
        """Decode rows [start, end) of the fixed decode layout: scratch row, no KV write."""
        R = self.max_rows
        buf = self.stage.dev
        buf[start:end] = self.scratch_row
        buf[R + start:R + end] = -1
        buf[2 * R + start:2 * R + end] = self.scratch_row * self.row_len + 1

    # ------------------------------------------------------------ mixed-step graphs

    def _mixed_layout(self, Tp: int) -> dict[str, int]:
        """Fixed offsets of a padded mixed step of Tp tokens in the staging buffer:
        tok_rows[Tp] tok_pos[Tp] rows[R1] seq[R1] cu[R1+1] tiles[2*NT] sidx[S] dst[S].
        R1 = max_rows + 1: request slot max_rows is always padding (no queries, no keys),
        and every padding tile points at it; NT bounds the real tiles (Tp/bq + one partial
        tile per request); S = sampled rows."""
        R1 = self.max_rows + 1
        NT = Tp // self.mixed_bq + R1
        S = min(Tp, self.max_rows)
        o_rows = 2 * Tp
        o_tiles = o_rows + 3 * R1 + 1
        o_sidx = o_tiles + 2 * NT
        return {"Tp": Tp, "R1": R1, "NT": NT, "S": S, "o_rows": o_rows, "o_seq": o_rows + R1, "o_cu": o_rows + 2 * R1,
                "o_tiles": o_tiles, "o_sidx": o_sidx, "o_dst": o_sidx + S, "end": o_sidx + 2 * S}

    def _fill_mixed(self, buf: np.ndarray, L: dict[str, int], states: list[Any], starts: list[int], qlens: list[int],
                    sidx: list[int], dst: list[int]) -> None:
        """Host side of a padded mixed step: the real requests first, then harmless padding
        (tokens: scratch row, position -1 = no KV write; requests: no queries, no keys;
        sampled rows: row 0 written to the scratch slot)."""
        Tp, R1, NT, S = L["Tp"], L["R1"], L["NT"], L["S"]
        R, T = len(states), sum(qlens)
        _write_token_rows(buf, Tp, states, starts, qlens)
        buf[T:Tp] = self.scratch_row
        buf[Tp + T:2 * Tp] = -1
        o = L["o_rows"]
        buf[o:o + R] = [st.row for st in states]
        buf[o + R:o + R1] = self.scratch_row
        o = L["o_seq"]
        buf[o:o + R] = [start + n for start, n in zip(starts, qlens)]
        buf[o + R:o + R1] = 0
        o = L["o_cu"]
        buf[o] = 0
        np.cumsum(qlens, out=buf[o + 1:o + 1 + R])
        buf[o + 1 + R:o + R1 + 1] = T
        tiles = tp.varlen_tiles(qlens, self.mixed_bq)
        o = L["o_tiles"]
        buf[o:o + len(tiles)] = tiles
        pad = buf[o + len(tiles):o + 2 * NT].reshape(-1, 2)
        pad[:, 0] = R1 - 1
        pad[:, 1] = 0
        o = L["o_sidx"]
        buf[o:o + len(sidx)] = sidx
        buf[o + len(sidx):o + S] = 0
        o = L["o_dst"]
        buf[o:o + len(dst)] = dst
        buf[o + len(dst):o + S] = self.scratch_row * self.row_len + 1

    def _prepare_mixed(self, Tp: int) -> None:
        L = self._mixed_layout(Tp)
        buf = self.stage.next()
        self._fill_mixed(buf, L, [], [], [], [], [])
        self.stage.upload(L["end"])

    def _mixed_step(self, Tp: int) -> None:
        """A padded mixed step read from the fixed layout (captured per Tp): forward,
        LM head on the sampled rows, greedy argmax written into the token buffer."""
        L = self._mixed_layout(Tp)
        d = self.stage.dev
        rows_tok, pos = d[:Tp], d[Tp:2 * Tp]
        valid = pos >= 0
        p = pos.clamp(min=0)
        tokens = self.r.tokens.view(-1)
        ids = tokens[rows_tok * self.row_len + p]
        slots = torch.where(valid, self.bt[rows_tok, p // self.bs] * self.bs + p % self.bs, -1)
        R1, NT, S = L["R1"], L["NT"], L["S"]
        d_rows, d_seq = d[L["o_rows"]:L["o_rows"] + R1], d[L["o_seq"]:L["o_seq"] + R1]
        d_cu, d_tiles = d[L["o_cu"]:L["o_cu"] + R1 + 1], d[L["o_tiles"]:L["o_tiles"] + 2 * NT]

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            return tp.paged_varlen_attention(q, kc, vc, self.bt, d_seq, d_cu, d_tiles, self.mixed_bq, self.scale, rows=d_rows, num_tiles=NT)

        hidden = self._forward(ids, p, slots, attend)
        logits = self._logits(hidden[d[L["o_sidx"]:L["o_sidx"] + S]], out=self.logits[:S])
        tok = fused_ops.argmax_rows(logits, out=self.sampled[:S], workspace=self.argmax_ws)
        tokens.index_copy_(0, d[L["o_dst"]:L["o_dst"] + S], tok)

    def _mixed_pad(self, sched: list[Any]) -> int | None:
        """The padded token count for a prefill/mixed step, or None (eager). Sampling
        extras (penalties, bias, grammar masks, logprobs) resample after the replay, as on
        decode steps; prompt logprobs need every position's logits, so those run eagerly."""
        if (self._so is not None and self.r.prompt_lp_reqs) or max(sr.num_tokens for sr in sched) < 2:
            return None
        return self._padded_tokens(sum(sr.num_tokens for sr in sched))

    def _padded_tokens(self, T: int) -> int | None:
        if self.mixed is not None:
            return self.mixed.padded(T)
        if not self.mixed_padded_eager:
            return None
        sizes = mixed_sizes(min(self.r.config.max_num_batched_tokens, MIXED_MAX_TOKENS))
        return next((t for t in sizes if t >= T), None)

    def _replay_mixed(self, Tp: int) -> None:
        if self.mixed is not None:
            self.mixed.replay(Tp)
        else:
            self._mixed_step(Tp)
        self.stats["mixed_graph_steps"] += 1

    def _run_mixed(self, sched, states, samplers, greedy, Tp, buf, upd_idx, upd_val, out) -> PendingOutput:
        L = self._mixed_layout(Tp)
        qlens = [sr.num_tokens for sr in sched]
        cu = np.cumsum(qlens)
        sidx = [int(cu[i]) - 1 for i, sr in enumerate(sched) if sr.sample]
        dst = [st.row * self.row_len + st.num_tokens for st in samplers]
        self._fill_mixed(buf, L, states, [sr.num_computed_tokens for sr in sched], qlens, sidx, dst)
        U = len(upd_idx)
        o_u = L["end"]
        buf[o_u:o_u + U] = upd_idx
        buf[o_u + U:o_u + 2 * U] = upd_val
        dev = self.stage.upload(o_u + 2 * U)
        self._apply_block_updates(dev, o_u, U)
        self._replay_mixed(Tp)
        S = len(samplers)
        for st in samplers:
            st.num_tokens += 1
        if not S:
            return ReadyOutput(out)
        if not greedy:
            return self._resample(samplers, self.logits[:S], dev[L["o_dst"]:L["o_dst"] + S], out)
        return self.r._pending(out, self.sampled[:S].clone())

    # ------------------------------------------------------------ a step

    def run(self, so: SchedulerOutput, out: RunnerOutput) -> PendingOutput:
        if self.idle_probe is None:
            return self._run(so, out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = self._run(so, out)
        end.record()
        self.idle_probe.append((start, end))
        return pending

    def idle_report(self) -> dict[str, float] | None:
        """Accelerator time between steps over the probed steps, from CUDA events (no
        profiler): a step is busy from its first enqueued op to its last; the gap from one
        step's end to the next one's start is the device waiting for the host."""
        ev, self.idle_probe = self.idle_probe, None
        if not ev or len(ev) < 2:
            return None
        ev[-1][1].synchronize()
        busy = sum(s.elapsed_time(e) for s, e in ev)
        gaps = [max(0.0, ev[i][1].elapsed_time(ev[i + 1][0])) for i in range(len(ev) - 1)]
        span = ev[0][0].elapsed_time(ev[-1][1])
        return {"steps": len(ev), "span_ms": span, "busy_ms": busy, "idle_ms": sum(gaps), "idle_share": sum(gaps) / span if span else 0.0,
                "max_gap_ms": max(gaps), "gaps_over_50us": sum(g > 0.05 for g in gaps)}

    def _run(self, so: SchedulerOutput, out: RunnerOutput) -> PendingOutput:
        r = self.r
        sched = so.scheduled
        B = len(sched)
        decode_only = all(sr.num_tokens == 1 and sr.sample for sr in sched)  # every row samples its next token
        pad = self.graphs.padded(B) if (self.graphs is not None and decode_only) else None
        buf = self.stage.next()
        R, bs, mb, row_len = self.max_rows, self.bs, self.max_blocks, self.row_len
        upd_idx: list[int] = []
        upd_val: list[int] = []
        states = []
        for sr in sched:
            st = r.reqs[sr.req_id]
            st.block_table.extend(sr.new_block_ids)
            # Send the device table every entry it lacks: entries another path (e.g. a
            # speculative step on the reference forward) appended count too.
            have, n_bt = st.device_blocks, len(st.block_table)
            if n_bt > have:
                base = st.row * mb
                upd_idx.extend(range(base + have, base + n_bt))
                upd_val.extend(st.block_table[have:n_bt])
                st.device_blocks = n_bt
            end = sr.num_computed_tokens + sr.num_tokens
            if end > st.num_tokens:
                raise RuntimeError(f"{sr.req_id}: step needs tokens up to {end} but the worker has {st.num_tokens}")
            if sr.sample and end != st.num_tokens:
                raise RuntimeError(f"{sr.req_id}: sampling at {end} but the worker has {st.num_tokens} tokens")
            states.append(st)
        samplers = [st for st, sr in zip(states, sched) if sr.sample]
        greedy = all(st.data.sampling.temperature == 0.0 and not (st.ban_ids and st.num_tokens - st.prompt_len < st.data.sampling.min_tokens)
                     for st in samplers)
        # Penalties, bias, grammar masks, logprobs (executors/torch/sampling_extras.py) go through _resample.
        self._so = so if r.extras.step_uses_extras(so) else None
        greedy = greedy and self._so is None
        out.req_ids = [sr.req_id for sr in sched if sr.sample]
        if decode_only and pad is not None:
            return self._run_decode(sched, states, samplers, greedy, pad, buf, upd_idx, upd_val, out)
        if not decode_only and (tpad := self._mixed_pad(sched)) is not None:
            return self._run_mixed(sched, states, samplers, greedy, tpad, buf, upd_idx, upd_val, out)
        return self._run_eager(sched, states, samplers, greedy, buf, upd_idx, upd_val, out)

    def _apply_block_updates(self, dev: torch.Tensor, off: int, n: int) -> None:
        if n:
            self.bt.view(-1).index_copy_(0, dev[off:off + n], dev[off + n:off + 2 * n])

    def _run_decode(self, sched, states, samplers, greedy, pad, buf, upd_idx, upd_val, out) -> PendingOutput:
        R, B, row_len = self.max_rows, len(sched), self.row_len
        rows = [st.row for st in states]
        pos = [sr.num_computed_tokens for sr in sched]
        buf[:B] = rows
        buf[R:R + B] = pos
        buf[2 * R:2 * R + B] = [st.row * row_len + st.num_tokens for st in states]
        if pad > B:
            buf[B:pad] = self.scratch_row
            buf[R + B:R + pad] = -1
            buf[2 * R + B:2 * R + pad] = self.scratch_row * row_len + 1
        U = len(upd_idx)
        off = 3 * R
        buf[off:off + U] = upd_idx
        buf[off + U:off + 2 * U] = upd_val
        dev = self.stage.upload(off + 2 * U)
        self._apply_block_updates(dev, off, U)
        assert self.graphs is not None
        self.graphs.replay(B)
        self.stats["graph_steps"] += 1
        for st in states:
            st.num_tokens += 1  # every decode row samples (num_tokens == 1 reaches the end)
        if not greedy:
            return self._resample(samplers, self.logits[:B], dev[2 * R:2 * R + B], out)
        return self.r._pending(out, self.sampled[:B].clone())

    def _pack_varlen(self, buf: np.ndarray, states: list[Any], starts: list[int], qlens: list[int]) -> dict[str, Any]:
        """Write a varlen step's per-token and per-request inputs at the start of `buf`:
        tok_rows[T] tok_pos[T] rows[R] seq[R] cu[R+1] tiles[2*NT]; returns the layout."""
        a = self.a
        R = len(states)
        T = sum(qlens)
        bq = tp.varlen_block_q(a.num_heads, a.num_kv_heads, max(qlens))
        _write_token_rows(buf, T, states, starts, qlens)
        o = 2 * T
        buf[o:o + R] = [st.row for st in states]
        buf[o + R:o + 2 * R] = [start + n for start, n in zip(starts, qlens)]
        cu = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu[1:])
        buf[o + 2 * R:o + 3 * R + 1] = cu
        o_tiles = o + 3 * R + 1
        tiles = tp.varlen_tiles(qlens, bq)
        NT = len(tiles) // 2
        buf[o_tiles:o_tiles + 2 * NT] = tiles
        return {"T": T, "R": R, "o": o, "o_tiles": o_tiles, "NT": NT, "bq": bq, "cu": cu, "end": o_tiles + 2 * NT}

    def _varlen_forward(self, dev: torch.Tensor, lay: dict[str, Any]) -> torch.Tensor:
        """The fused eager forward over a packed varlen step: hidden states [T, H] (final norm not applied)."""
        T, R, o, NT, bq = lay["T"], lay["R"], lay["o"], lay["NT"], lay["bq"]
        d_rows_tok, d_pos = dev[:T], dev[T:2 * T]
        d_rows, d_seq, d_cu = dev[o:o + R], dev[o + R:o + 2 * R], dev[o + 2 * R:o + 3 * R + 1]
        d_tiles = dev[lay["o_tiles"]:lay["o_tiles"] + 2 * NT]
        ids = self.r.tokens.view(-1)[d_rows_tok * self.row_len + d_pos]
        slots = self.bt[d_rows_tok, d_pos // self.bs] * self.bs + d_pos % self.bs

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            return tp.paged_varlen_attention(q, kc, vc, self.bt, d_seq, d_cu, d_tiles, bq, self.scale, rows=d_rows, num_tiles=NT)

        self.stats["eager_steps"] += 1
        return self._forward(ids, d_pos, slots, attend)

    def verify_logits(self, states: list[Any], starts: list[int], qlens: list[int], logit_rows: list[int]) -> torch.Tensor:
        """Speculative verification (executors/torch/spec_decode.py): float32 logits of the
        flattened-batch rows `logit_rows`, from the mixed-step graph (its sampled rows are
        the logit rows, its argmax goes to the scratch slot) or, past the largest graph,
        the fused eager forward. The requests' block tables must already be on the device."""
        buf = self.stage.next()
        self.stats["spec_steps"] = self.stats.get("spec_steps", 0) + 1
        tpad = self._padded_tokens(sum(qlens)) if max(qlens) > 1 else None
        lay = self._mixed_layout(tpad) if tpad is not None else None
        if lay is not None and len(logit_rows) <= lay["S"]:
            scratch = [self.scratch_row * self.row_len + 1] * len(logit_rows)
            self._fill_mixed(buf, lay, states, starts, qlens, logit_rows, scratch)
            self.stage.upload(lay["end"])
            self._replay_mixed(tpad)
            return self.logits[:len(logit_rows)].float()
        lay = self._pack_varlen(buf, states, starts, qlens)
        o_l, L = lay["end"], len(logit_rows)
        buf[o_l:o_l + L] = logit_rows
        dev = self.stage.upload(o_l + L)
        hidden = self._varlen_forward(dev, lay)
        if not L:
            return hidden.new_zeros((0, self.a.vocab_size), dtype=torch.float32)
        return self._logits(hidden[dev[o_l:o_l + L]]).float()

    def _run_eager(self, sched, states, samplers, greedy, buf, upd_idx, upd_val, out) -> PendingOutput:
        qlens = [sr.num_tokens for sr in sched]
        lay = self._pack_varlen(buf, states, [sr.num_computed_tokens for sr in sched], qlens)
        cu = lay["cu"]
        o_s = lay["end"]
        sidx = [int(cu[i + 1]) - 1 for i, sr in enumerate(sched) if sr.sample]
        S = len(sidx)
        buf[o_s:o_s + S] = sidx
        buf[o_s + S:o_s + 2 * S] = [st.row * self.row_len + st.num_tokens for st in samplers]
        o_u = o_s + 2 * S
        U = len(upd_idx)
        buf[o_u:o_u + U] = upd_idx
        buf[o_u + U:o_u + 2 * U] = upd_val
        dev = self.stage.upload(o_u + 2 * U)
        self._apply_block_updates(dev, o_u, U)
        tokens = self.r.tokens.view(-1)
        hidden = self._varlen_forward(dev, lay)

        def logits_at(flat: torch.Tensor) -> torch.Tensor:
            return self._logits(hidden[flat]).float()

        flat_offsets = {sr.req_id: int(cu[i]) for i, sr in enumerate(sched)} if self._so is not None else None
        if not S:
            ctx = self.r.extras.plan_prompt_logprobs(None, self._so, self.r.reqs, flat_offsets) if (self._so is not None and self.r.prompt_lp_reqs) else None
            if ctx is None:
                return ReadyOutput(out)
            return self.r._pending(out, None, self.r.extras.device_outputs(ctx, None, None, logits_at, self.r.tokens), ctx)
        h = hidden[dev[o_s:o_s + S]]
        logits = self._logits(h)
        for st in samplers:
            st.num_tokens += 1
        dst = dev[o_s + S:o_s + 2 * S]
        if not greedy:
            return self._resample(samplers, logits, dst, out, logits_at, flat_offsets)
        tok = fused_ops.argmax_rows(logits, workspace=self.argmax_ws)
        tokens.index_copy_(0, dst, tok)
        return self.r._pending(out, tok)

    def _resample(self, samplers, logits: torch.Tensor, dst: torch.Tensor, out: RunnerOutput, logits_at=None,
                  flat_offsets: dict[str, int] | None = None) -> PendingOutput:
        """Non-greedy rows, or a step with sampling extras: the reference sampler on float32
        logits (positions as before the token), after penalties / bias / grammar masks."""
        from aiosched.executors.torch.sampler import sample

        r, so = self.r, self._so
        for st in samplers:
            st.num_tokens -= 1  # _sampling_batch and the extras read the position being sampled
        ctx = None
        if so is not None:
            ctx = r.extras.begin(so, samplers)
            if r.prompt_lp_reqs and flat_offsets is not None:
                ctx = r.extras.plan_prompt_logprobs(ctx, so, r.reqs, flat_offsets)
        raw = logits.float()
        proc = r.extras.process(ctx, raw, r.tokens)  # grammar: waits for the previous step's ids here
        batch = r._sampling_batch(samplers)
        for st in samplers:
            st.num_tokens += 1
        tok = sample(proc, batch)
        extra = r.extras.device_outputs(ctx, raw, tok, logits_at, r.tokens)
        r.tokens.view(-1).index_copy_(0, dst, tok)
        return r._pending(out, tok, extra, ctx)

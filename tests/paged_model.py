"""Our torch model over a paged KV cache with shuffled (non-contiguous) blocks, stepped
like the runner: the logits-level parity tests (Llama family, new families) share it."""
from __future__ import annotations

import pathlib
import random

import torch

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.loader import build_model


class PagedModel:
    """A model, a KV cache and a tiny block allocator: runs ragged steps like the runner."""

    def __init__(self, path: pathlib.Path, num_blocks: int, block_size: int, max_pos: int) -> None:
        self.model = build_model(str(path), "float32", "cpu")
        self.model.init_rope(max_pos)
        self.block = block_size
        a = self.model.args
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        self.kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(a.num_layers)]
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)  # block tables are not contiguous
        self.tables: dict[int, list[int]] = {}

    def step(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (request, its tokens this step, position of the first). Returns each
        chunk's logits [len, vocab]."""
        bs = self.block
        ids, pos, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
        for req, toks, start in chunks:
            table = self.tables.setdefault(req, [])
            end = start + len(toks)
            while len(table) * bs < end:
                table.append(self.free.pop())
            ids += toks
            pos += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(end)
            tables.append(table)
        meta = AttentionMetadata(torch.tensor(slots), qsl, seq_lens, tables, bs)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), meta, self.kv)
            logits = self.model.compute_logits(hidden)
        return [logits[qsl[i] : qsl[i + 1]] for i in range(len(chunks))]

"""Paged KV cache bookkeeping with prefix caching. Pure Python: no torch here.

The pool hands out fixed-size block ids; the worker owns the memory behind them.
A full block is identified by a hash chain over its tokens (each hash includes the
parent's), so equal prefixes map to equal blocks. Blocks with no owner but a hash
stay reusable until evicted, least recently freed first.

Per-request block tables and hash chains grow by one entry per `block_size` tokens for
the request's life: they are int64 buffers (`TokenIds`), not lists of ints that every
full garbage collection would walk. `Request.num_kv_slots` (tokens its blocks hold) lets
the scheduler skip `allocate` for the steps that stay inside the last block.
"""
from __future__ import annotations

import array
from collections.abc import Iterator
from dataclasses import dataclass

from aiosched.request import Request
from aiosched.token_ids import TokenIds

# Hashes of full blocks (Python's tuple hash: a signed 64-bit value) and block ids, one
# int64 buffer per request.
_Ids = TokenIds
_item = array.array.__getitem__  # indexing and slicing in C (TokenIds' own __getitem__ is Python)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class FreeBlocks:
    """The free blocks in LRU order (front = next to evict), as a doubly linked list over
    block ids in int64 arrays: O(1) push at the back, pop from the front and removal of
    any block, like the `OrderedDict[int, None]` it replaces (the same operations), but
    no Python object per block for every full garbage collection to visit."""

    __slots__ = ("_prev", "_next", "_in", "_head", "_tail", "_n")

    def __init__(self, num_blocks: int) -> None:  # all blocks free, in id order
        self._prev = array.array("q", range(-1, num_blocks - 1))
        self._next = array.array("q", range(1, num_blocks + 1))
        if num_blocks:
            self._next[-1] = -1
        self._in = bytearray(b"\x01") * num_blocks
        self._head, self._tail, self._n = (0, num_blocks - 1, num_blocks) if num_blocks else (-1, -1, 0)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, b: object) -> bool:
        return isinstance(b, int) and 0 <= b < len(self._in) and self._in[b] == 1

    def __iter__(self) -> Iterator[int]:
        b, nxt = self._head, self._next
        while b != -1:
            yield b
            b = nxt[b]

    def __setitem__(self, b: int, _value: None) -> None:
        """Append at the back (the most recently freed); a block already free keeps its place."""
        if self._in[b]:
            return
        self._in[b] = 1
        tail = self._tail
        self._prev[b], self._next[b] = tail, -1
        if tail == -1:
            self._head = b
        else:
            self._next[tail] = b
        self._tail = b
        self._n += 1

    def __delitem__(self, b: int) -> None:
        if not self._in[b]:
            raise KeyError(b)
        p, n = self._prev[b], self._next[b]
        if p == -1:
            self._head = n
        else:
            self._next[p] = n
        if n == -1:
            self._tail = p
        else:
            self._prev[n] = p
        self._in[b] = 0
        self._n -= 1

    def popitem(self, last: bool = False) -> tuple[int, None]:
        """The front (least recently freed) block; `last=True` is not supported."""
        assert not last, "the pool only evicts from the front"
        b = self._head
        if b == -1:
            raise KeyError("popitem(): no free block")
        del self[b]
        return b, None


class BlockHashes:
    """Each block's content hash or None, indexable like the `list[int | None]` it
    replaces: int64 values plus a flag per block, nothing for the collector to visit."""

    __slots__ = ("_h", "_set")

    def __init__(self, num_blocks: int) -> None:
        self._h = array.array("q", bytes(8 * num_blocks))
        self._set = bytearray(num_blocks)

    def __len__(self) -> int:
        return len(self._set)

    def __getitem__(self, b: int) -> int | None:
        return self._h[b] if self._set[b] else None

    def __setitem__(self, b: int, h: int | None) -> None:
        if h is None:
            self._set[b] = 0
        else:
            self._h[b] = h
            self._set[b] = 1

    def __iter__(self) -> Iterator[int | None]:
        return (self[b] for b in range(len(self._set)))


class BlockPool:
    """Ref-counted blocks; free blocks kept in an LRU (front = next to evict).

    Per-block state is int64 arrays (reference counts, content hashes, the free list):
    it is as large as the pool, lives as long as the engine, and a list per field would
    be up to `num_blocks` pointers for every full collection to follow."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = array.array("q", bytes(8 * num_blocks))
        self.block_hash = BlockHashes(num_blocks)
        self.free = FreeBlocks(num_blocks)
        self.cached: dict[int, int] = {}  # hash -> block id (ints only: CPython stops tracking such a dict)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), "caller checks num_free first"
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict: its content is about to be overwritten
                del self.cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cache hits (reviving free cached blocks)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1

    def release(self, blocks: list[int]) -> None:
        # Reverse order: a sequence's tail blocks are evicted before its head.
        for b in reversed(blocks):
            self.ref_cnt[b] -= 1
            assert self.ref_cnt[b] >= 0, f"block {b} freed twice"
            if self.ref_cnt[b] == 0:
                self.free[b] = None

    def register(self, b: int, h: int) -> None:
        if self.block_hash[b] is None and h not in self.cached:
            self.block_hash[b] = h
            self.cached[h] = b

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)


def hash_block(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class KVCacheManager:
    """Per-request block tables over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.blocks: dict[str, TokenIds] = {}  # block table per request (compares equal to a list)
        self.hashes: dict[str, TokenIds] = {}  # hashes of the request's full blocks so far
        self.num_registered: dict[str, int] = {}  # leading blocks already offered to the cache
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, req: Request, num_full: int) -> TokenIds:
        """Extend and return the request's hash chain up to `num_full` blocks."""
        hs = self.hashes.get(req.req_id)
        if hs is None:
            hs = self.hashes[req.req_id] = _Ids()
        if len(hs) >= num_full:
            return hs
        bs = self.block_size
        toks = req.all_token_ids
        parent = _item(hs, -1) if hs else None
        while len(hs) < num_full:
            i = len(hs)
            parent = hash_block(parent, tuple(_item(toks, slice(i * bs, (i + 1) * bs))))
            hs.append(parent)
        return hs

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks matching the request's known tokens (not yet referenced).

        At least one token is left to compute so the step produces logits."""
        if not self.enable_caching:
            return []
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in self._block_hashes(req, max_blocks):
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate(self, req: Request, num_new_tokens: int, cached: list[int] | None = None) -> list[int] | None:
        """Blocks to add so the request holds num_computed + num_new_tokens tokens.

        `cached` are prefix hits for a request being admitted. Returns the new block
        ids (cached ones first) or None if the pool cannot supply them."""
        have = self.blocks.get(req.req_id)
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - (len(have) if have is not None else 0)
        if not cached:  # hot path: a running request, usually needing no new block
            if need <= 0:
                return []
            if need > self.pool.num_free:
                return None
            new = self.pool.allocate(need)
        else:
            need -= len(cached)
            # Hits sitting in the free list stop being allocatable once we touch them.
            revived = sum(1 for b in cached if self.pool.ref_cnt[b] == 0)
            if need + revived > self.pool.num_free:
                return None
            self.pool.touch(cached)
            new = cached + self.pool.allocate(max(need, 0))
        if have is None:
            have = self.blocks[req.req_id] = _Ids(new)
        else:
            have.extend(new)
        req.num_kv_slots = len(have) * self.block_size
        return new

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += num_hit_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Register hashes of blocks whose tokens are all known and scheduled."""
        if not self.enable_caching:
            return
        n_tokens = req.num_computed_tokens
        known = len(req.all_token_ids)
        upto = n_tokens if n_tokens < known else known
        if upto < req.next_full_block_at:  # the usual case: called for every request twice a step
            return
        num_full = upto // self.block_size
        done = self.num_registered.get(req.req_id, 0)
        if num_full <= done:
            req.next_full_block_at = (done + 1) * self.block_size
            return
        blocks = self.blocks.get(req.req_id)
        if blocks is None:
            return
        num_full = min(num_full, len(blocks))
        hashes = self._block_hashes(req, num_full)
        register = self.pool.register
        for i in range(done, num_full):
            register(_item(blocks, i), _item(hashes, i))
        self.num_registered[req.req_id] = num_full
        req.next_full_block_at = (num_full + 1) * self.block_size

    def free(self, req: Request) -> None:
        blocks = self.blocks.pop(req.req_id, None)
        if blocks is not None:
            self.pool.release(blocks)
        self.hashes.pop(req.req_id, None)
        self.num_registered.pop(req.req_id, None)
        req.next_full_block_at = 0
        req.num_kv_slots = 0

    def check_invariants(self) -> None:
        """Every block is free (ref 0, in the LRU) or owned (ref > 0); counts add up; a
        block table never holds a block twice; the hash index and the blocks' hashes agree."""
        owned: dict[int, int] = {}
        for rid, bl in self.blocks.items():
            assert len(set(bl)) == len(bl), f"{rid}: a block appears twice in its table"
            for b in bl:
                owned[b] = owned.get(b, 0) + 1
        assert len(self.pool.free) + len(owned) == self.pool.num_blocks
        for b in range(self.pool.num_blocks):
            assert self.pool.ref_cnt[b] == owned.get(b, 0), f"block {b}: ref {self.pool.ref_cnt[b]} != owners {owned.get(b, 0)}"
            assert (b in self.pool.free) == (self.pool.ref_cnt[b] == 0), f"block {b} free-list mismatch"
            h = self.pool.block_hash[b]
            assert h is None or self.pool.cached.get(h) == b, f"block {b} has a hash the index does not map to it"
        for h, b in self.pool.cached.items():
            assert self.pool.block_hash[b] == h

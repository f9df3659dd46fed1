"""TokenIds: an append-only token history in one int64 buffer.

A request's history (prompt + every output token) lives as long as the request and
grows by a token per step. Kept as a `list[int]`, every token is a pointer to an int
object (ids >= 256 are separate objects), and every full garbage collection walks
every pointer of every live history: at batch 256 and 4k tokens that is millions of
visits per collection, stalling the event loop. Here the ids are raw int64 values in
one `array.array` buffer (amortised O(1) append, done in C), which the collector sees
as a single object with nothing inside to visit.

It still reads like the list it replaces: len, indexing, iteration, slicing (a
`TokenIds` again), `+`, `+=` with any iterable of ints, and `==` with lists.
"""
from __future__ import annotations

import array
from collections.abc import Iterable
from typing import Any, SupportsIndex, overload

_TYPECODE = "q"  # int64: any vocabulary, and the fake runner's 61-bit prefix hashes


class TokenIds(array.array):  # type: ignore[type-arg]
    __slots__ = ()  # no per-instance dict: the object stays one buffer

    def __new__(cls, ids: Iterable[int] = ()) -> "TokenIds":
        if isinstance(ids, array.array) and ids.typecode == _TYPECODE:
            return super().__new__(cls, _TYPECODE, ids)  # a buffer copy, no int objects
        return super().__new__(cls, _TYPECODE, ids if isinstance(ids, (list, tuple)) else list(ids))

    @overload
    def __getitem__(self, key: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> "TokenIds": ...

    def __getitem__(self, key: Any) -> Any:
        got = array.array.__getitem__(self, key)
        # A slice of the base type would compare unequal to a list: keep the type.
        return TokenIds(got) if isinstance(key, slice) else got

    def __eq__(self, other: object) -> bool:
        if isinstance(other, array.array):
            return array.array.__eq__(self, other)
        if isinstance(other, list):
            return len(self) == len(other) and self.tolist() == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __iadd__(self, other: Iterable[int]) -> "TokenIds":  # type: ignore[override]
        self.extend(other)  # array's own += takes only arrays; extend takes any iterable, in C
        return self

    def __add__(self, other: Iterable[int]) -> "TokenIds":  # type: ignore[override]
        out = TokenIds(self)
        out += other
        return out

    def __radd__(self, other: Iterable[int]) -> list[int]:
        # list + TokenIds: a list, as list + list would give
        return list(other) + self.tolist()

    def __repr__(self) -> str:
        return f"TokenIds({self.tolist()!r})"

    def __copy__(self) -> "TokenIds":  # array's own would return a plain array
        return TokenIds(self)

    def __deepcopy__(self, memo: Any) -> "TokenIds":
        return TokenIds(self)

"""Hypothesis strategy for bounded JSON schemas (structured-output tests).

Every schema has a finite worst-case output (bounded strings, integer ranges, arrays
with maxItems, closed objects), so a random or hash "model" constrained by it must
finish within `max_tokens`: a valid output is then guaranteed, not just likely.
"""
from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

# The schema of issue 16.1's reproduction (a constrained request preempted once).
ISSUE16_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 900},
                                                               "b": {"enum": ["x", "yy", "zzz"]}}, "required": ["a", "b"]}

_KEY = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=6)
_ENUM_VALUE = st.one_of(st.text(alphabet=string.ascii_letters + " -", max_size=5), st.integers(-50, 50), st.booleans(), st.none())
_PATTERNS = ["^[a-z]{1,6}$", "^[0-9]{3}-[0-9]{4}$", "^(red|green|blue)$", "^[A-Z][a-z]{0,4}$"]


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-1000, 1000), st.integers(0, 5000)),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.sampled_from(_PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
        st.lists(_ENUM_VALUE, min_size=1, max_size=4, unique_by=json.dumps).map(lambda e: {"enum": e}),
        _ENUM_VALUE.map(lambda v: {"const": v}),
    )


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    array = st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                      children, st.integers(0, 1), st.integers(0, 2))
    obj = st.dictionaries(_KEY, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req), "additionalProperties": False}))
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda alts: {"anyOf": alts})
    return st.one_of(array, obj, any_of)


def worst_case_bytes(s: dict[str, Any]) -> int:
    """An upper bound on the compact JSON text of any instance (escapes counted as 6 bytes)."""
    if "enum" in s:
        return max(len(json.dumps(v)) for v in s["enum"])
    if "const" in s:
        return len(json.dumps(s["const"]))
    if "anyOf" in s:
        return max(worst_case_bytes(a) for a in s["anyOf"])
    t = s.get("type")
    if t == "boolean":
        return 5
    if t == "null":
        return 4
    if t == "integer":
        return max(len(str(s["minimum"])), len(str(s["maximum"])))
    if t == "string":
        return 2 + 6 * s.get("maxLength", 6)
    if t == "array":
        return 2 + s["maxItems"] * (worst_case_bytes(s["items"]) + 1)
    if t == "object":
        return 2 + sum(len(k) + 4 + worst_case_bytes(v) for k, v in s["properties"].items())
    raise AssertionError(s)


def json_schemas(max_bytes: int = 300) -> st.SearchStrategy[dict[str, Any]]:
    """Top-level schemas: mostly objects, depth <= 3, worst case <= max_bytes of JSON."""
    inner = st.recursive(_leaf(), _extend, max_leaves=6)
    top = st.one_of(
        st.dictionaries(_KEY, inner, min_size=1, max_size=4).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}),
        inner,
    )
    return top.filter(lambda s: worst_case_bytes(s) <= max_bytes)

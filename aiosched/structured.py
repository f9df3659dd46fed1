"""Structured-output specs: validation at generate() time and the grammar text workers compile.

The engine calls `validate_structured()` before a request is queued, so a bad spec
(invalid JSON, a JSON schema the grammar engine cannot express, a bad regex, a
grammar with a syntax error or an undefined rule) is a ValueError naming the field
(`structured.json_schema`, `structured.regex`, `structured.grammar`) and costs no
scheduling or model work. Results are cached by spec text, so a schema repeated
across requests is validated once.

Grammar engine: llguidance (see docs/structured_output.md for why), a dependency with
no dependencies of its own; it does not need torch, so this module stays in the
torch-free `aiosched` layer (imported lazily: a missing install is a ValueError). Workers turn the same spec into
the same grammar text with `grammar_for()` and build per-request matchers from it
(`executors/structured_output.py`); that direction (executors -> aiosched) is the
only one.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from aiosched.sampling_params import StructuredOutputParams

# JSON is compact: no free whitespace between tokens. With flexible whitespace a model
# may emit spaces or newlines forever and never close the object.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_VALIDATION_CACHE_SIZE = 1024


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured: structured output needs the llguidance package (pip install 'llguidance>=1.9')") from None
    return llguidance


def spec_of(s: StructuredOutputParams) -> tuple[str, str]:
    """(field name, spec text) of the one field that is set."""
    if s.json_schema is not None:
        return "json_schema", s.json_schema
    if s.regex is not None:
        return "regex", s.regex
    if s.grammar is not None:
        return "grammar", s.grammar
    if s.json_object:
        return "json_object", ""
    raise ValueError("structured: exactly one of json_schema, json_object, regex, grammar must be set, got none")


@functools.lru_cache(maxsize=_VALIDATION_CACHE_SIZE)
def _grammar(kind: str, text: str) -> str:
    """Spec -> llguidance grammar text, validated. Raises ValueError naming the field."""
    llg = _llguidance()
    field = f"structured.{kind}"
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{field}: not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field}: a JSON schema must be an object (or a boolean), got {type(schema).__name__}")
        try:
            g = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    elif kind == "json_object":
        g = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    elif kind == "regex":
        if not text:
            raise ValueError(f"{field}: must not be empty")
        g = llg.LLMatcher.grammar_from_regex(text)
    elif kind == "grammar":
        if not text.strip():
            raise ValueError(f"{field}: must not be empty")
        try:
            # GBNF/EBNF (`root ::= ...`) is converted to Lark; Lark (`start: ...`) passes as is.
            g = llg.grammar_from("grammar", text)
        except ValueError as e:
            msg = str(e).removeprefix("Failed to convert the grammar from GBNF to Lark: ")
            raise ValueError(f"{field}: unknown or invalid grammar syntax (expected GBNF/EBNF `root ::= ...` or Lark `start: ...`): {msg}") from None
    else:  # pragma: no cover - spec_of() gives only the kinds above
        raise ValueError(f"structured: unknown kind {kind!r}")
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(g)
    if is_error:
        msg = messages[0] if messages else "invalid"
        raise ValueError(f"{field}: {_short(msg)}")
    return g


def _short(msg: str, limit: int = 500) -> str:
    msg = msg.strip()
    return msg if len(msg) <= limit else msg[:limit] + "..."


def grammar_for(s: StructuredOutputParams) -> str:
    """The llguidance grammar text for a spec (validated, cached)."""
    return _grammar(*spec_of(s))


def validate_structured(s: StructuredOutputParams | None) -> None:
    """Raise ValueError naming the field when the spec is not usable. Cached per spec."""
    if s is None:
        return
    s.validate()
    grammar_for(s)

"""Generate docs/config_reference.md from the config Structs (the single source of truth).

    python tools/gen_config_docs.py          # rewrite docs/config_reference.md
    python tools/gen_config_docs.py --check  # exit 1 if it is out of date (CI, tests)

Field names, types and defaults come from `msgspec.structs.fields`; descriptions
are the `# comments` on each field's line in the source, and `# Section` comment
lines inside a class body start a new table.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import io
import pathlib
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from aiosched.config import EngineConfig, SpeculativeConfig  # noqa: E402
from aiosched.openai_protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from aiosched.sampling_params import SamplingParams, StructuredOutputParams  # noqa: E402

OUTPUT = ROOT / "docs" / "config_reference.md"

# SamplingParams fields whose OpenAI request field has another name (or none).
_API_NAMES = {
    "max_tokens": "`max_tokens`, `max_completion_tokens`",
    "logprobs": "`logprobs` (completions: an int; chat: `logprobs` + `top_logprobs`)",
    "structured": "`response_format`",
    "stop": "`stop` (a string or a list)",
    "logit_bias": "`logit_bias` (token-id strings as keys)",
    "top_k": "`top_k` (-1 also disables)",
    "best_of": "`best_of` (completions)",
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: Any) -> str:
    if f.default is not msgspec.NODEFAULT:
        v = f.default
    elif f.default_factory is not msgspec.NODEFAULT:
        v = f.default_factory()
    else:
        return "required"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"`{v:_}`"
    return f"`{v!r}`"


def _comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(field -> trailing comment, field -> section it opens) from the class source."""
    src = textwrap.dedent(inspect.getsource(cls))
    line_comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line_comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    lines = src.splitlines()
    trailing, sections = {}, {}
    prev_end = body.lineno  # the `class` line (one line: no multi-line bases here)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if node.lineno in line_comments and not lines[node.lineno - 1].lstrip().startswith("#"):
                trailing[name] = line_comments[node.lineno]
            titles = [line_comments[ln] for ln in range(prev_end + 1, node.lineno) if lines[ln - 1].lstrip().startswith("#")]
            if titles:  # comment lines just above a field open a section
                sections[name] = " ".join(titles)
        prev_end = node.end_lineno or node.lineno
    return trailing, sections


def _engine_flag(name: str) -> str:
    from aiosched.engine_args import _RENAME, _SKIP

    if name in _SKIP:
        return "`--speculative-tokens N`" if name == "speculative" else ""
    return "`--" + _RENAME.get(name, name.replace("_", "-")) + "`"


def _api_name(name: str) -> str:
    if name in _API_NAMES:
        return _API_NAMES[name]
    request_fields = {f.name for cls in (CompletionRequest, ChatCompletionRequest) for f in msgspec.structs.fields(cls)}
    return f"`{name}`" if name in request_fields else "—"


def _table(cls: type, extra: tuple[str, Any] | None) -> list[str]:
    trailing, sections = _comments(cls)
    head = ["Field", "Type", "Default"] + ([extra[0]] if extra else []) + ["Description"]
    out: list[str] = []
    for f in msgspec.structs.fields(cls):
        if f.name in sections or not out:
            if out:
                out.append("")
            if f.name in sections:
                out += [f"**{sections[f.name].rstrip('.')}**", ""]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells = [f"`{f.name}`", "`" + _type_name(f.type).replace("|", "\\|") + "`", _default(f).replace("|", "\\|")]
        if extra:
            cells.append(extra[1](f.name))
        cells.append(trailing.get(f.name, "").replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return out


def render() -> str:
    parts = [
        "<!-- Generated by tools/gen_config_docs.py from the config Structs; do not edit by hand. -->",
        "# Configuration reference",
        "",
        "## EngineConfig",
        "",
        "Engine settings: a dict, keyword arguments, or a TOML file (top level or an `[engine]` table),",
        "`AsyncEngine.from_config(...)` / `EngineConfig.load(...)`. Every field is also a command-line flag",
        "of `aiosched generate|serve|bench` (flags override `--config FILE`). Invalid values raise",
        "`ValueError` naming the field.",
        "",
        *_table(EngineConfig, ("CLI flag", _engine_flag)),
        "",
        "### SpeculativeConfig (`speculative`)",
        "",
        *_table(SpeculativeConfig, None),
        "",
        "## SamplingParams",
        "",
        "Per-request settings, `engine.generate(prompt, SamplingParams(...))`. `validate()` (run by",
        "`generate`) raises `ValueError` naming the first bad field; the server turns that into HTTP 400",
        "with `param` set to the request field. The last column is the OpenAI API request field.",
        "",
        *_table(SamplingParams, ("OpenAI API field", _api_name)),
        "",
        "### StructuredOutputParams (`structured`)",
        "",
        *_table(StructuredOutputParams, None),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

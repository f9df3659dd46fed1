"""Chat templates: where a model's template comes from, and rendering it with jinja2.

Sources, first found wins (as transformers reads them):
1. an override (`--chat-template FILE`, `build_app(chat_template=...)`, or the
   `chat_template=` argument): a file path or the template text itself;
2. `chat_template.jinja` in the model dir (what transformers >= 4.49 writes), with
   named alternatives in `additional_chat_templates/NAME.jinja`;
3. `chat_template.json` (`{"chat_template": ...}`, older processors);
4. `tokenizer_config.json`'s `chat_template` (one template, or a list of named ones).

Rendering follows Hugging Face chat templates: a sandboxed environment with
`trim_blocks`/`lstrip_blocks`, the `raise_exception`/`strftime_now` globals, a
`tojson` filter, `{% generation %}` blocks (rendered as their body), and the
variables `messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token`,
`eos_token`, `pad_token`, `unk_token`, plus any extra keyword arguments (e.g.
`enable_thinking`). Messages are OpenAI-style dicts; `normalize_messages` turns
content parts into text and assistant `tool_calls` arguments into objects, which is
what templates index into.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from aiosched.tokenizer import Tokenizer

Template = str | list[dict[str, str]]
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or rejected the conversation."""


# ---------------------------------------------------------------- sources


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def load_chat_template(model_dir: str | os.PathLike[str] | None, tokenizer_config: dict[str, Any] | None = None) -> Template | None:
    """The model dir's chat template (sources 2-4 above), or None."""
    if model_dir is not None:
        d = Path(model_dir)
        main = _read_text(d / "chat_template.jinja")
        extra_dir = d / "additional_chat_templates"
        extra = sorted(extra_dir.glob("*.jinja")) if extra_dir.is_dir() else []
        if main is not None and extra:
            return [{"name": "default", "template": main}] + [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        if main is not None:
            return main
        js = _read_text(d / "chat_template.json")
        if js is not None:
            try:
                t = json.loads(js).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                raise ChatTemplateError(f"{d / 'chat_template.json'}: not a JSON object with a chat_template") from None
            if t:
                return t
    return (tokenizer_config or {}).get("chat_template") or None


def read_template_override(value: str | os.PathLike[str]) -> str:
    """`--chat-template`: a file, or (when it looks like one) the template text itself."""
    p = Path(value)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    text = str(value)
    if "{{" in text or "{%" in text:
        return text
    raise ValueError(f"chat_template: {value!r} is neither a file nor a jinja template")


def select_template(template: Template | None, name: str = "default") -> str | None:
    """tokenizer_config.json may hold one template or a list of named ones."""
    if template is None or isinstance(template, str):
        return template
    by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return by_name.get(name) or by_name.get("default") or next(iter(by_name.values()), None)


# ---------------------------------------------------------------- rendering


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant tokens with it): the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def render_chat(template: Template | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, tools: list[dict[str, Any]] | None = None,
                **kwargs: Any) -> str:
    """Render `messages` ([{"role", "content", ...}, ...]) to the prompt text."""
    source = select_template(template, "tool_use" if tools else "default")
    if not source:
        raise ChatTemplateError("this model has no chat template (no chat_template.jinja, and tokenizer_config.json has no "
                                "chat_template); pass one with --chat-template, or use /v1/completions")
    tmpl = _compile(source)
    variables: dict[str, Any] = {k: (v or "") for k, v in (special_tokens or {}).items()}
    variables.setdefault("documents", None)
    variables.update(kwargs)
    try:
        return tmpl.render(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"{where}.content[{j}]: only text content parts are supported, got type {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatTemplateError(f"{where}.content: must be a string or a list of content parts")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> what templates expect: text content; tool-call arguments as objects."""
    if not messages:
        raise ChatTemplateError("messages: must not be empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ChatTemplateError(f"{where}.role: must be one of {', '.join(ROLES)}; got {role!r}")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["content"] = _content_text(m.get("content"), where)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                call = {k: v for k, v in call.items() if v is not None}
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    # Templates index into the arguments (Llama 3, Qwen): give them the object.
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass
                call["function"] = fn
                call.setdefault("type", "function")
                calls.append(call)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def apply_chat_template(tokenizer: "Tokenizer | None", messages: list[dict[str, Any]], /, *, tools: list[dict[str, Any]] | None = None,
                        add_generation_prompt: bool = True, chat_template: str | None = None, tokenize: bool = False,
                        **template_kwargs: Any) -> Any:
    """Render OpenAI-style `messages` with the model's chat template (or `chat_template`).

    Returns the prompt text, or its token ids with `tokenize=True` (the template writes
    the special tokens itself, so none are added). `tools`: OpenAI tool definitions
    (`[{"type": "function", "function": {...}}]`), given to the template as `tools`.
    Raises ChatTemplateError (a ValueError) for a missing template or a conversation
    the template rejects."""
    if tokenizer is None:
        raise ChatTemplateError("messages: this model has no tokenizer (tokenizer.json), so chat is unavailable")
    for reserved in ("messages", "add_generation_prompt", "tools"):
        if reserved in template_kwargs:
            raise ChatTemplateError(f"chat_template_kwargs: {reserved!r} cannot be overridden")
    template = chat_template if chat_template is not None else tokenizer.chat_template
    specials = {k: v for k, v in tokenizer.special_tokens.items() if k not in template_kwargs}
    text = render_chat(template, normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                       special_tokens=specials, tools=tools, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False) if tokenize else text

"""Render a model's chat template (tokenizer_config.json `chat_template`) with jinja2.

Same conventions as Hugging Face chat templates: a sandboxed environment with
`trim_blocks`/`lstrip_blocks`, the `raise_exception`/`strftime_now` globals, a
`tojson` filter, and the variables `messages`, `add_generation_prompt`,
`bos_token`, `eos_token` (plus any extra keyword arguments).
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or rejected the conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def select_template(template: str | list[dict[str, str]] | None, name: str = "default") -> str | None:
    """tokenizer_config.json may hold one template or a list of named ones."""
    if template is None or isinstance(template, str):
        return template
    by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return by_name.get(name) or next(iter(by_name.values()), None)


def render_chat(template: str | list[dict[str, str]] | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, **kwargs: Any) -> str:
    """Render `messages` ([{"role", "content"}, ...]) to the prompt text."""
    source = select_template(template)
    if not source:
        raise ChatTemplateError("this model has no chat template (tokenizer_config.json has no chat_template); use /v1/completions")
    tmpl = _compile(source)
    variables = {k: (v or "") for k, v in (special_tokens or {}).items()}
    variables.update(kwargs)
    try:
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None

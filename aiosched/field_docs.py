"""The `# comments` on a config Struct's fields: one source for the docs and the CLI's help.

`docs/config_reference.md` (tools/gen_config_docs.py) and every engine flag's `--help`
text read the same comments, so a field documented once is documented everywhere.
"""
from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(field -> trailing comment, field -> section it opens) from the class source.

    A comment at the end of a field's line describes it; comment lines just above a
    field open a section (e.g. `# KV cache`)."""
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
            if titles:
                sections[name] = " ".join(titles)
        prev_end = node.end_lineno or node.lineno
    return trailing, sections

"""mkdocs hooks: the reference pages are generated from the code when the site is built.

A page holds a marker line ``<!-- generated: NAME -->``; :func:`on_page_markdown` replaces it with
the Markdown of NAME: ``config-keys`` (every config key, its type, default and the comment beside
its field), ``cli`` (every command's ``--help``) or ``api`` (the public names of each package, their
signatures and docstrings). Sphinx roles in docstrings (``:func:`x```) become code spans.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import re
import tokenize
from contextlib import redirect_stdout

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`~?([^`]+)`")
API_MODULES = ("fastllm.models", "fastllm.nn", "fastllm.optim", "fastllm.data", "fastllm.hf", "fastllm.train",
               "fastllm.sharding", "fastllm.checkpoint", "fastllm.evaluation", "fastllm.generate", "fastllm.config",
               "fastllm.random", "fastllm.tree")


def plain(text: str) -> str:
    """A docstring as Markdown: Sphinx roles and double backquotes become code spans."""
    return ROLE.sub(r"`\1`", text or "").replace("``", "`")


def field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment on its line}`` from a dataclass's source (empty when there is none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, name = {}, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NEWLINE or token.type == tokenize.NL:
            name = None
        elif token.type == tokenize.NAME and name is None and token.start[1] == 4:
            name = token.string
        elif token.type == tokenize.COMMENT and name is not None:
            comments.setdefault(name, token.string.lstrip("# ").strip())
    return comments


def _section_classes():
    from fastllm.models.config import ModelConfig
    from fastllm.train.config import Config

    classes = {"model": ModelConfig}
    for field in dataclasses.fields(Config):
        classes.setdefault(field.name, field.type if isinstance(field.type, type) else
                           type(field.default_factory()))
    return classes


def config_keys() -> str:
    from fastllm.config import schema
    from fastllm.train.config import Config

    comments = {section: field_comments(cls) for section, cls in _section_classes().items()}
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default in schema(Config):
        section, _, name = key.partition(".")
        note = comments.get(section, {}).get(name.split(".")[0], "")
        shown = "the default table (docs/sharding.md)" if key == "mesh.rules" else repr(default)
        rows.append(f"| `{key}` | `{tp}` | `{shown}` | {note.replace('|', '/')} |")
    return "\n".join(rows)


def cli() -> str:
    from fastllm.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for name, sub in commands.choices.items():
        parts += [f"## fastllm {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def api() -> str:
    parts = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        parts += [f"## `{module_name}`", "", plain(inspect.getdoc(module) or ""), ""]
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            kind = "class" if inspect.isclass(obj) else "def" if callable(obj) else ""
            head = f"{kind} {name}{_signature(obj) if callable(obj) else ''}".strip()
            doc = plain(inspect.getdoc(obj) or "") if callable(obj) else ""
            parts += [f"### `{name}`", "", "```python", head, "```", "", doc, ""]
    return "\n".join(parts)


GENERATORS = {"config-keys": config_keys, "cli": cli, "api": api}


def on_page_markdown(markdown: str, page, config, files) -> str:
    with redirect_stdout(io.StringIO()):
        return MARKER.sub(lambda match: GENERATORS[match.group(1)](), markdown)

"""MkDocs hook: the CLI and configuration references, generated at build time.

A page holding ``<!-- generated: cli -->`` gets ``overstory --help`` and the help of
every sub-command (argparse's own text, from the parser the ``overstory`` command
runs); one holding ``<!-- generated: config -->`` gets a table of every ``Config``
key with its type, default, bounds and docstring. Nothing is copied by hand, so the
reference cannot drift from the code: a new flag or key appears on the next build.

A key without a docstring fails the build: every key is documented where it is declared.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import itertools
import os
import textwrap
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pydantic
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

CLI_MARKER = "<!-- generated: cli -->"
CONFIG_MARKER = "<!-- generated: config -->"
#: Help is wrapped at this width whatever the terminal building the docs.
HELP_WIDTH = "88"

# Where the ``overstory`` command's parser may live (the console script's module first).
_CLI_MODULES = ("overstory.cli", "overstory.cli.main", "overstory.runtime.cli")
_PARSER_FACTORIES = ("build_parser", "make_parser", "parser", "_parser")
_CONFIG_MODULES = ("overstory.config", "overstory.runtime.config")


# --- CLI --------------------------------------------------------------------------------


def _cli_module_names() -> list[str]:
    names = [ep.module for ep in entry_points(group="console_scripts", name="overstory")]
    return names + [name for name in _CLI_MODULES if name not in names]


def find_parser() -> argparse.ArgumentParser:
    """The parser ``overstory`` parses its arguments with."""
    tried = []
    for module_name in _cli_module_names():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            tried.append(f"{module_name} (not importable)")
            continue
        for attr in _PARSER_FACTORIES:
            factory = getattr(module, attr, None)
            if callable(factory):
                parser = factory()
                if isinstance(parser, argparse.ArgumentParser):
                    return parser
        tried.append(f"{module_name} (no {'/'.join(_PARSER_FACTORIES)})")
    raise RuntimeError("cannot find the overstory command's parser; tried " + ", ".join(tried))


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for sub in _subcommands(parser):
        yield from _walk(sub)


def cli_reference() -> str:
    """Markdown: one section per command, its ``--help`` as argparse prints it."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parts = []
        for parser in _walk(find_parser()):
            level = "#" * min(2 + parser.prog.count(" "), 4)
            anchor = parser.prog.replace(" ", "-")
            parts.append(
                f"{level} `{parser.prog}` {{#{anchor}}}\n\n```text\n{parser.format_help().rstrip()}\n```\n"
            )
        return "\n".join(parts)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


# --- Config -----------------------------------------------------------------------------


def find_config() -> type[pydantic.BaseModel]:
    for module_name in _CONFIG_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        config = getattr(module, "Config", None)
        if isinstance(config, type) and issubclass(config, pydantic.BaseModel):
            return config
    raise RuntimeError("cannot find overstory's Config in " + ", ".join(_CONFIG_MODULES))


def attribute_docstrings(model: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotated assignment."""
    docs: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if klass is object or not issubclass(klass, pydantic.BaseModel):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        statements = body.body
        for statement, following in itertools.pairwise(statements):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`"
    if field.default_factory is not None:
        try:
            made = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "computed"
        # An empty container says all; anything else may depend on the environment.
        return f"`{made!r}`" if made in ({}, [], ()) else "computed (see the description)"
    return "required"


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _bounds(field: FieldInfo) -> str:
    shown = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                shown.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
    return ", ".join(shown)


def _nested_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def config_rows(
    model: type[pydantic.BaseModel], prefix: str = ""
) -> Iterator[tuple[str, str, str, str, str]]:
    """``(key, type, default, bounds, doc)`` per key; a nested settings model's keys
    are dotted (``section.key``)."""
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            yield from config_rows(nested, f"{prefix}{name}.")
            continue
        doc = field.description or docs.get(name, "")
        yield (
            f"{prefix}{name}",
            _type_name(field.annotation),
            _default(field),
            _bounds(field),
            doc,
        )


def _cell(text: str) -> str:
    """One table cell: one line, ``|`` escaped outside code spans (tables keep those)."""
    pieces = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(pieces))


def _table(rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | bounds | what |", "|---|---|---|---|---|"]
    lines += [
        f"| `{key}` | `{kind}` | {default} | {bounds} | {_cell(doc) or '—'} |"
        for key, kind, default, bounds, doc in rows
    ]
    return lines


def config_reference() -> str:
    """Markdown: the top-level keys, then a section per group of settings (its TOML
    table, its docstring, its keys); fails the build on a key without a docstring."""
    config = find_config()
    rows = list(config_rows(config))
    undocumented = [key for key, *_, doc in rows if not doc]
    if undocumented:
        raise RuntimeError("config keys without a docstring: " + ", ".join(undocumented))
    lines = [f"`{config.__module__}.{config.__qualname__}`: {len(rows)} keys.\n"]
    top = [row for row in rows if "." not in row[0]]
    lines += _table(top)
    for name, field in config.model_fields.items():
        group = _nested_model(field.annotation)
        if group is None:
            continue
        doc = inspect.cleandoc(group.__doc__ or "")
        lines += ["", f"## `{name}`", "", doc, ""]
        lines += _table([row for row in rows if row[0].startswith(f"{name}.")])
    return "\n".join(lines) + "\n"


# --- the hook ---------------------------------------------------------------------------


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    return markdown

"""The docs' generated references (docs/hooks.py, docs/griffe_rest.py), without MkDocs.

The CLI and config references are rendered from the code at every docs build; these
tests check the generators themselves: that nested sub-commands and every ``Config`` key
reach the page, that docstrings, defaults and bounds are read right, and that no new
config key comes without a docstring.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pydantic
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hooks = _load("hooks")
griffe_rest = _load("griffe_rest")


class _Limits(pydantic.BaseModel):
    per_minute: int = pydantic.Field(60, ge=1, le=10_000)
    """Requests per minute."""


class _Settings(pydantic.BaseModel):
    name: str = "x"
    """The name."""
    plain: float | None = None
    tags: dict[str, str] = pydantic.Field(default_factory=dict)
    """Free-form tags."""
    limits: _Limits = pydantic.Field(default_factory=_Limits)


def test_config_rows_read_docstrings_defaults_bounds_and_nested_sections() -> None:
    rows = {key: rest for key, *rest in hooks.config_rows(_Settings)}
    assert rows["name"] == ["str", "`'x'`", "", "The name."]
    assert rows["plain"] == ["float | None", "`None`", "", ""]
    assert rows["tags"] == ["dict[str, str]", "`{}`", "", "Free-form tags."]
    assert rows["limits.per_minute"] == ["int", "`60`", "≥ 1, ≤ 10,000", "Requests per minute."]
    assert "limits" not in rows


def test_every_config_key_is_in_the_reference() -> None:
    config = hooks.find_config()
    page = hooks.config_reference()
    keys = [key for key, *_ in hooks.config_rows(config)]
    assert len(keys) >= len(config.model_fields)
    for key in keys:
        assert f"| `{key}` |" in page, key


def test_every_config_key_has_a_docstring() -> None:
    undocumented = [key for key, *_, doc in hooks.config_rows(hooks.find_config()) if not doc]
    assert not undocumented, f"config keys without a docstring: {undocumented}"


def test_a_key_without_a_docstring_fails_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "find_config", lambda: _Settings)
    with pytest.raises(RuntimeError, match="plain"):
        hooks.config_reference()


def test_cli_reference_has_every_command_level(monkeypatch: pytest.MonkeyPatch) -> None:
    page = hooks.cli_reference()
    for prog in (
        "overstory",
        "overstory demo",
        "overstory serve",
        "overstory keys",
        "overstory keys rotate-data",
        "overstory vault ls",
        "overstory quota set",
    ):
        assert f"`{prog}` {{#{prog.replace(' ', '-')}}}" in page, prog
    assert "usage: overstory keys create" in page
    # argparse wraps at the hook's width, whatever the terminal running the build
    for columns in ("40", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        assert hooks.cli_reference() == page
        assert os.environ["COLUMNS"] == columns


def test_rest_roles_and_literal_markers_become_markdown() -> None:
    convert = griffe_rest.rest_roles_to_markdown
    assert convert("a :class:`~overstory.agent.Agent` b") == "a `Agent` b"
    assert convert(":mod:`overstory.rollout` and :meth:`Runtime.send`") == (
        "`overstory.rollout` and `Runtime.send`"
    )
    assert convert("the tree::\n\n    Root") == "the tree:\n\n    Root"
    assert convert("see below ::\n\n    x") == "see below\n\n    x"
    assert convert("``literal`` stays") == "``literal`` stays"

"""The public API says what it means: every error a user or a tool author catches is
exported from ``overstory``, the internal retry signals are not, and
``overstory.testing`` names the extra it needs (no Ray here)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import overstory
import overstory.exceptions as exceptions

#: Signals the runtime raises and catches inside itself (a client re-routes, a write is
#: dropped); a user never sees one. They stay importable from ``overstory.exceptions``.
INTERNAL = frozenset({"Fenced", "Passivated", "SequenceConflict", "StaleShardTable"})

ROOT = Path(__file__).resolve().parent.parent


def _error_classes() -> set[str]:
    return {
        name
        for name, value in vars(exceptions).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == exceptions.__name__
        and not name.startswith("_")
    }


def test_every_exception_is_public_or_listed_internal() -> None:
    errors = _error_classes()
    assert errors >= INTERNAL, f"INTERNAL names no such error: {sorted(INTERNAL - errors)}"
    public = set(overstory.__all__)
    missing = sorted(errors - INTERNAL - public)
    assert not missing, f"errors a user catches but overstory does not export: {missing}"
    leaked = sorted(INTERNAL & public)
    assert not leaked, f"internal signals exported from overstory: {leaked}"


def test_exceptions_module_lists_every_error() -> None:
    assert _error_classes() <= set(exceptions.__all__)


def test_every_name_in_all_is_importable() -> None:
    for name in overstory.__all__:
        assert hasattr(overstory, name), name
    assert len(set(overstory.__all__)) == len(overstory.__all__)


def test_internal_signals_stay_importable_from_exceptions() -> None:
    for name in INTERNAL:
        assert issubclass(getattr(exceptions, name), exceptions.OverstoryError)


def _imports_of(package: Path) -> set[str]:
    """Top-level distributions ``package``'s modules import (absolute imports only)."""
    import ast

    names: set[str] = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names


def _requirement_name(spec: str) -> str:
    for stop in "[<>=!~; ":
        spec = spec.partition(stop)[0]
    return spec.strip().lower().replace("-", "_")


def test_testing_extra_declares_what_overstory_testing_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    testing = {_requirement_name(r) for r in extras["testing"]}
    stdlib = set(sys.stdlib_module_names)
    third_party = _imports_of(ROOT / "overstory" / "testing") - stdlib - {"overstory"}
    undeclared = sorted(third_party - core - testing)
    assert not undeclared, f"overstory.testing imports {undeclared}, in no extra"
    assert "aiohttp" in testing
    assert any(r.startswith("overstory[") and "testing" in r for r in extras["test"]), extras[
        "test"
    ]


def test_testing_without_its_extra_names_the_extra() -> None:
    # A child interpreter where aiohttp cannot be imported (as without the extra): the
    # package and its tools module import (hosts import overstory.testing.tools); the
    # servers fail with an ImportError that names the extra and keeps the cause.
    code = (
        "import sys\n"
        "sys.modules['aiohttp'] = None\n"
        "import overstory.testing, overstory.testing.tools\n"
        "try:\n"
        "    from overstory.testing import OpenAIServer\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "    print(type(exc.__cause__).__name__)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "pip install 'overstory[testing]'" in out, out
    assert "aiohttp" in out, out
    assert out.splitlines()[-1] in ("ImportError", "ModuleNotFoundError"), out  # chained

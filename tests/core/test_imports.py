"""raftkv/core is sans-IO: it imports the standard library and itself, nothing else."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE_DIR = Path(__file__).resolve().parents[2] / "raftkv" / "core"
CORE_PACKAGE = "raftkv.core"


def foreign_imports(source: str) -> list[str]:
    """Modules imported by `source` that are neither stdlib nor raftkv.core (sorted)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                continue  # relative: inside the package itself
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            in_core = name == CORE_PACKAGE or name.startswith(CORE_PACKAGE + ".")
            if not in_core and top not in sys.stdlib_module_names:
                found.add(name)
    return sorted(found)


CORE_MODULES = sorted(CORE_DIR.rglob("*.py"))


def test_the_core_package_is_where_the_test_looks() -> None:
    assert {p.name for p in CORE_MODULES} >= {"__init__.py", "node.py", "log.py", "quorum.py"}


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_module_imports_only_stdlib_and_the_core(path: Path) -> None:
    assert foreign_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import lmdb", ["lmdb"]),
        ("import os, msgpack.ext", ["msgpack.ext"]),
        ("from falcon import App", ["falcon"]),
        ("from raftkv.runtime import loop", ["raftkv.runtime"]),
        ("from raftkv import core", ["raftkv"]),
        ("import raftkv.corex", ["raftkv.corex"]),
        ("def f():\n    import waitress\n", ["waitress"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lmdb\n", ["lmdb"]),
    ],
)
def test_checker_flags_a_foreign_import(source: str, expected: list[str]) -> None:
    assert foreign_imports(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import random, enum, collections.abc",
        "from dataclasses import dataclass",
        "import raftkv.core.types",
        "from raftkv.core import quorum",
        "from raftkv.core.log import RaftLog",
        "from . import quorum",
        "from .types import Entry",
    ],
)
def test_checker_accepts_stdlib_and_core_imports(source: str) -> None:
    assert foreign_imports(source) == []

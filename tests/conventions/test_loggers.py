"""Every module logs through a logger named after itself (`logging.getLogger(__name__)`), so
that one module's level can be set on its own; a literal name is allowed only for another
library's logger (e.g. quieting "waitress.queue")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUR_PACKAGES = ("raftkv", "storage", "snapshots", "benchmarks")


def sources() -> list[Path]:
    return sorted(p for pkg in OUR_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def literal_logger_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger" and node.args
                and isinstance(node.args[0], ast.Constant)):
            names.append(str(node.args[0].value))
    return names


def test_no_logger_of_ours_is_named_by_hand() -> None:
    found = {str(p.relative_to(ROOT)): names for p in sources()
             if (names := [n for n in literal_logger_names(p)
                           if n.split(".")[0] in OUR_PACKAGES])}
    assert found == {}, f"use logging.getLogger(__name__) in: {found}"


def test_the_check_sees_a_hand_named_logger(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('import logging\nlog = logging.getLogger("raftkv.node")\n'
                      'logging.getLogger("waitress.queue").setLevel(40)\n')
    assert literal_logger_names(module) == ["raftkv.node", "waitress.queue"]

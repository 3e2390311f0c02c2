"""Dependencies point one way: flows -> tasks -> core, storage; core imports no prefect/duckdb/storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "core": {"prefect", "duckdb", "storage", "tasks", "flows"},
    "storage": {"prefect", "tasks", "flows"},
    "tasks": {"flows"},
}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_layering_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import prefect\nfrom duckdb import connect\n")
    assert imported_roots(bad) >= {"prefect", "duckdb"}


STORAGE_MAY_IMPORT_FROM_CORE = {
    "core.errors": "error types",
    "core.ratings": "the blind-rating vocabulary (names, no computation)",
    "core.circuit": "the graph vocabulary: nodes, edges, node order (no computation, no torch)",
}
TRANSCODER_FILES = {
    "storage/checkpoints.py",
    *(f"storage/formats/{p.name}" for p in (ROOT / "storage/formats").glob("*.py")),
}
"""The transcoder file formats still build core.transcoder.Transcoder objects (the only other core import)."""


def runtime_core_imports(path: Path) -> set[str]:
    """core.* modules a file imports when it runs: `if TYPE_CHECKING:` bodies (annotations) are skipped."""
    found: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m == "core" or m.startswith("core.")}


def test_storage_imports_no_core_algorithm():
    """storage/ reads and writes plain arrays, dicts and Arrow tables; tasks/ convert to and from core's objects."""
    offenders = {}
    for path in sorted((ROOT / "storage").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        allowed = set(STORAGE_MAY_IMPORT_FROM_CORE) | ({"core.transcoder"} if name in TRANSCODER_FILES else set())
        extra = sorted(runtime_core_imports(path) - allowed)
        if extra:
            offenders[name] = extra
    assert offenders == {}


def test_core_import_checker_skips_type_only_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from core.mining import X\n"
        "def f():\n    from core.attribution import Y\n"
    )
    assert runtime_core_imports(src) == {"core.attribution"}

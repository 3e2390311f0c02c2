"""What code a stage's key covers: the modules that compute its artifact, and nothing else.

Mechanism: the closure over the project's import graph, from the stage's own module, with two rules.
1. Imports under `if TYPE_CHECKING:` never count (annotations do not run); imports inside functions do (they run).
2. Modules that cannot change what a stage computes are not followed (`NOT_COMPUTING`): the config schema
   (a stage's settings enter its key as values), error types, the store's paths and publish protocol, the
   Prefect wrapper, key derivation and progress reporting.

Why a closure and not a declared list per stage: a declared list goes stale silently when a stage starts
using a new module, and a stale list means a cached artifact computed by other code (a wrong result, not a
slow one). The closure can only over-cover, and over-covering is visible: `circuitflow plan` names the files
and the table-driven test in tests/storage/test_stage_keys.py pins, module by module, which stage keys an
edit changes. Keeping it narrow is the code structure's job: storage/ imports no core algorithm, and stages
share loaders through small modules (tasks/transcoders.py) instead of importing each other. docs/caching.md
has the table.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache, lru_cache
from pathlib import Path

KEY_LENGTH = 16
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent

PROJECT_PACKAGES = ("core", "storage", "tasks")
"""The packages whose sources a stage's result can depend on (flows/ only compose; they never change a result)."""

STAGE_MODULES = {"import": "storage.checkpoints"}
"""Stages whose code is not `tasks/<stage>.py`: "import" (external transcoders) is computed by the loader."""

NOT_COMPUTING = frozenset(
    {
        "core.config",  # the schema: each stage's settings enter its key by value
        "core.errors",  # exception types and messages
        "storage.layout",  # store paths, keys and the atomic publish protocol
        "storage.stagecode",  # this module
        "storage.provenance",  # why a stage reruns (plan/run messages)
        "tasks.common",  # the cached-task wrapper and logging
        "tasks.plan",  # key derivation and pre-flight checks
        "tasks.train_progress",  # the Prefect progress artifact of training
        "tasks.locking",  # runs sharing a store wait for each other's stages
        "storage.links",  # where the Prefect artifacts point (the serve address)
    }
)
"""Modules a stage's code version does not follow: editing them changes no stage key."""


def stage_module(stage: str) -> str | None:
    """The module a stage's code starts from, or None (then the stage covers every project source)."""
    module = STAGE_MODULES.get(stage, f"tasks.{stage}")
    return module if _module_file(module) else None


@cache
def code_version(stage: str | None = None) -> str:
    """Hash of the sources a stage computes with (`stage_files`); without a stage (or for a stage without a
    module), of every source file of the project packages."""
    digest = hashlib.sha256()
    for name, sha in code_files(stage).items():
        digest.update(name.encode())
        digest.update(sha.encode())
    return digest.hexdigest()[:KEY_LENGTH]


def code_files(stage: str | None = None) -> dict[str, str]:
    """{path relative to the checkout: sha256 of its bytes} of the files a stage's code version covers."""
    module = stage_module(stage) if stage else None
    files = source_closure(module) if module else _all_sources()
    return {p.relative_to(_PACKAGE_ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def source_closure(module: str) -> list[Path]:
    """`module`'s source file and those of every project module (and package) it imports at run time,
    transitively, not following NOT_COMPUTING; sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None or (name in NOT_COMPUTING and name != module):
            continue
        seen[name] = path
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # their __init__ runs first
        todo.extend((_imported_modules(path) | parents) - seen.keys())
    return sorted(set(seen.values()))


def _all_sources() -> list[Path]:
    return sorted(p for package in PROJECT_PACKAGES for p in (_PACKAGE_ROOT / package).rglob("*.py"))


def _module_file(module: str) -> Path | None:
    """The source file of a dotted project module (a package's `__init__.py`), or None."""
    base = _PACKAGE_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path) -> set[str]:
    """Project modules a source file imports at run time (`from pkg import mod` counts `pkg.mod`), skipping
    the bodies of `if TYPE_CHECKING:` blocks."""
    found = _imports_in(path.read_bytes())
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES and _module_file(m)}


@lru_cache(maxsize=1024)
def _imports_in(source: bytes) -> frozenset[str]:
    """Every module name a source text imports at run time (parsed once per distinct text)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) bodies."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )

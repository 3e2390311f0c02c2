"""The one place that derives store paths from content keys, and the atomic stage-directory protocol.

A stage writes into `<root>/<stage>/<key>.tmp-<uuid>/`, writes `manifest.json` last, then renames
the directory to `<root>/<stage>/<key>/`. A directory without a manifest is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.errors import UserError

MANIFEST = "manifest.json"
KEY_LENGTH = 16
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class StoreError(UserError, RuntimeError):
    """A store problem described in one line."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of every Python source file in core/ and storage/: a change there changes every key."""
    digest = hashlib.sha256()
    for package in ("core", "storage"):
        for path in sorted((_PACKAGE_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:KEY_LENGTH]


def stage_key(stage: str, settings: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """Content key of a stage: its name, its own settings, its inputs' keys and the code version."""
    payload = {"stage": stage, "settings": settings, "inputs": inputs or {}, "code": code_version()}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    """The final directory of a stage's artifact."""
    return Path(root) / stage / key


def is_complete(path: str | Path) -> bool:
    """A stage directory is complete iff its manifest exists."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a complete stage directory's manifest; raise StoreError when it is incomplete."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise StoreError(f"{path}: no {MANIFEST}; the stage did not finish (rerun it)")
    return json.loads(file.read_text())


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_file(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Context manager yielding a temp path next to `path`; renamed over it on success, removed on error."""
    return _atomic_file(Path(path))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staging(root: str | Path, stage: str, key: str) -> Iterator[Path]:
    """Yield a fresh temp directory for a stage; on success the caller has written the manifest and
    the directory is renamed into place (replacing an older complete one, e.g. under --force).
    On error the temp directory is removed and nothing becomes visible."""
    final = stage_dir(root, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if not is_complete(tmp):
            raise StoreError(f"{tmp}: stage finished without writing {MANIFEST}")
        publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp directory into place, moving an existing one aside first."""
    if final.exists():
        trash = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def scratch_dir(root: str | Path, stage: str, key: str) -> Path:
    """A persistent work-in-progress directory for resumable stages (kept across interruptions)."""
    path = Path(root) / stage / f"{key}.partial"
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish_scratch(scratch: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into a resumable stage's scratch directory, then publish it."""
    write_json_atomic(scratch / MANIFEST, manifest)
    publish(scratch, final)


def complete_dirs(root: str | Path, stage: str) -> list[Path]:
    """All complete artifact directories of a stage, oldest first."""
    base = Path(root) / stage
    if not base.is_dir():
        return []
    dirs = [p for p in base.iterdir() if p.is_dir() and "." not in p.name and is_complete(p)]
    return sorted(dirs, key=lambda p: (p / MANIFEST).stat().st_mtime)


def within_store(root: str | Path, path: str | Path) -> Path:
    """Resolve `path` and refuse it when it escapes the store root."""
    root_r = Path(root).resolve()
    resolved = (root_r / path).resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise StoreError(f"{path}: path escapes the store {root_r}; use a path inside it")
    return resolved


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

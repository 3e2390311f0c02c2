"""The one place that derives store paths from content keys, and the atomic stage-directory protocol.

A stage writes into `<root>/<stage>/<key>.tmp-<owner>-<rand>/`, writes `manifest.json` last, then publishes
the directory as `<root>/<stage>/<key>/`; a directory without a manifest is never read. Publishing over an
existing artifact (`--force`) swaps the two directories in one atomic rename (Linux renameat2 with
RENAME_EXCHANGE), so `<key>/` is at every instant either the old or the new complete artifact, and it stays a
plain directory: readers (loaders, DuckDB globs) need no indirection, unlike versioned directories behind a
symlink, which every reader, copier and remover would have to follow. Where the exchange is unsupported (not
Linux, or a filesystem without it) the old directory is renamed aside first, leaving a short window without it.

Temp names carry their writer (`<owner>` = `<pid>@<host hash>`): a kill leaves them behind, and the next stage
that builds in the same folder removes those whose writer is dead (never a live writer's, nor another host's).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.errors import UserError
from storage.stagecode import KEY_LENGTH, code_version

MANIFEST = "manifest.json"
_TEMP_NAME = re.compile(r"\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$")
"""A temp or displaced entry written by this module: `<name>.tmp-<pid>@<host>-<rand>` (hidden files start with
a dot) or `<key>.old-<pid>@<host>-<rand>` (the non-atomic publish's displaced artifact)."""
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class StoreError(UserError, RuntimeError):
    """A store problem described in one line."""


class StoreWriteError(StoreError, OSError):
    """A file of the store could not be written (disk full, permissions): one line, nothing partial left."""


def stage_key(stage: str, settings: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """Content key of a stage: its name, its own settings, its inputs' keys and its code version."""
    payload = {"stage": stage, "settings": settings, "inputs": inputs or {}, "code": code_version(stage)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]
    _PAYLOADS[key] = json.loads(blob)
    return key


_PAYLOADS: dict[str, dict[str, Any]] = {}
"""What each key computed in this process was made of (stage, settings, inputs, code), for its manifest."""


def key_payload(key: str) -> dict[str, Any] | None:
    """The stage, settings, inputs and code version a key was computed from in this process, or None."""
    return _PAYLOADS.get(key)


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


# ---------------------------------------------------------------- temp names and their owners


@lru_cache(maxsize=1)
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(path: str | Path, hidden: bool = True, kind: str = "tmp") -> Path:
    """A fresh sibling name for writing `path`: `.<name>.tmp-<owner>-<rand>` (hidden) or `<name>.tmp-...`."""
    path = Path(path)
    prefix = "." if hidden else ""
    return path.with_name(f"{prefix}{path.name}.{kind}-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale(path: str | Path) -> bool:
    """A temp entry of this module whose writer is dead: written on this host by a process that no longer
    exists. Entries of live processes (this one included), of other hosts and foreign names are not stale."""
    match = _TEMP_NAME.search(Path(path).name)
    if match is None or match["host"] != _host():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _alive(pid)


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the stale temp entries (directories or files) directly inside `folder`; returns them."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    removed = [p for p in entries if is_stale(p)]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def remove_stale_files(folder: str | Path) -> list[Path]:
    """Remove stale hidden temp files anywhere under `folder` (torn writes of killed processes)."""
    removed = [p for p in Path(folder).rglob(".*") if p.is_file() and is_stale(p)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------- atomic files


def store_write_error(path: Path, err: OSError) -> StoreWriteError:
    """The one-line error for a failed write of `path`."""
    reason = err.strerror or str(err) or type(err).__name__
    error = StoreWriteError(
        f"could not write {path}: {reason}; free disk space or check the permissions of {path.parent}, "
        "then rerun (nothing partial was kept)"
    )
    error.errno = err.errno
    return error


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then rename over `path`."""
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_file(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Context manager yielding a temp path next to `path`; renamed over it on success, removed on error.
    An OSError (full disk, permissions) becomes a one-line StoreWriteError naming `path`."""
    return _atomic_file(Path(path))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except StoreWriteError:
        raise
    except OSError as err:
        raise store_write_error(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- stage directories


@contextlib.contextmanager
def staging(root: str | Path, stage: str, key: str) -> Iterator[Path]:
    """Yield a fresh temp directory for a stage; on success the caller has written the manifest and
    the directory is published (replacing an older complete one, e.g. under --force).
    On error the temp directory is removed and nothing becomes visible. Stale temp directories of
    killed writers in the stage's folder are removed first."""
    final = stage_dir(root, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp = temp_path(final, hidden=False)
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
    """Rename a finished temp directory into place. Over an existing `final` the two are exchanged
    atomically and the old one (now at `tmp`) is removed; without the exchange, the old one is moved
    aside first."""
    if not final.exists():
        try:
            os.rename(tmp, final)
            return
        except OSError as err:  # published meanwhile by a concurrent writer of the same key
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = temp_path(final, hidden=False, kind="old")
    os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


@lru_cache(maxsize=1)
def _renameat2() -> Any:
    """libc's renameat2 (glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic rename; False where the system or filesystem cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def scratch_dir(root: str | Path, stage: str, key: str) -> Path:
    """A persistent work-in-progress directory for resumable stages (kept across interruptions).
    Opening it removes what killed writers left: stale temp entries beside it and torn temp files in it."""
    path = Path(root) / stage / f"{key}.partial"
    path.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    remove_stale_files(path)
    return path


def finish_scratch(scratch: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into a resumable stage's scratch directory, then publish it. Over an existing
    artifact (--force) the scratch directory first takes a temp name, so the displaced artifact never lands
    in the scratch directory a later run would resume from."""
    write_json_atomic(scratch / MANIFEST, manifest)
    if not final.exists():
        publish(scratch, final)
        return
    tmp = temp_path(final, hidden=False)
    os.rename(scratch, tmp)
    try:
        publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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

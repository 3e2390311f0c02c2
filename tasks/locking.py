"""Runs that share a store compute each stage once: stage tasks run in SERIALIZABLE Prefect transactions whose
locks are files in the store, so a second run that reaches a stage the first is computing waits for it and then
finds the artifact complete (the task returns it as cached).

Prefect's file-system lock manager is used with three changes: a lock file is written whole in one step (its
holder is never read half-written), it records the holder's process so that a lock left by a killed run is
broken instead of waited on forever, and a run that waits says once what it waits for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

LOCK_DIR = ".locks"
"""Under the store: one `<cache key>.lock` file per stage being computed."""
POLL_S = 0.2
"""Seconds between looks at a held lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLockManager(FileSystemLockManager):
    """File locks in `<store>/.locks/`, written atomically, broken when their holder process is gone."""

    def __init__(self, lock_files_directory: Path) -> None:
        super().__init__(lock_files_directory)
        self.announce = True

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self._lock_path_for_key(key)
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not ours or torn by hand: treat it as held, by nobody known
            return {"holder": "", "pid": None, "host": None, "path": path}
        return {**info, "path": path}

    def _stale(self, info: dict[str, Any]) -> bool:
        return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"])

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._read(key)
        if info is not None and self._stale(info):
            self._break(info)  # its run was killed: nothing is being computed
            return False
        return info is not None

    def _break(self, stale: dict[str, Any]) -> None:
        """Remove the stale lock that was read as `stale`, and only that one: a waiter that read the same dead
        holder after another waiter broke it and took the lock must not remove the new holder's lock."""
        path = stale["path"]
        tomb = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, tomb)  # atomic: whatever lock is there now is moved aside whole
        except FileNotFoundError:
            return
        try:
            moved = json.loads(tomb.read_text())
        except (OSError, ValueError):
            moved = {}
        if (moved.get("holder"), moved.get("pid")) != (stale.get("holder"), stale.get("pid")):
            try:
                os.link(tomb, path)  # a live lock replaced the stale one meanwhile: put it back
            except FileExistsError:
                pass
        tomb.unlink(missing_ok=True)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._read(key)
        return info is not None and info.get("holder") == holder

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        body = json.dumps({"holder": holder, "expiration": None, "pid": os.getpid(), "host": socket.gethostname()})
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(body)
        waited, start = False, time.monotonic()
        try:
            while True:
                try:
                    os.link(tmp, path)  # atomic: the lock appears with its holder written
                    return True
                except FileExistsError:
                    if self.is_lock_holder(key, holder):
                        return True
                if not self.is_locked(key):
                    continue
                if not waited:
                    self._say_waiting(key)
                    waited = True
                if acquire_timeout is not None and time.monotonic() - start > acquire_timeout:
                    return False
                time.sleep(POLL_S)
        finally:
            tmp.unlink(missing_ok=True)

    def release_lock(self, key: str, holder: str) -> None:
        if self.is_lock_holder(key, holder):
            self._lock_path_for_key(key).unlink(missing_ok=True)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        start = time.monotonic()
        while self.is_locked(key):
            if timeout is not None and time.monotonic() - start > timeout:
                return False
            time.sleep(POLL_S)
        return True

    def _say_waiting(self, key: str) -> None:
        info = self._read(key) or {}
        stage = key.removeprefix("circuitflow-").replace("-", "/", 1)
        line = f"waiting for another run (pid {info.get('pid', '?')}) that is computing {stage}"
        logging.getLogger("circuitflow").info(line)
        if sys.__stdout__ is not None:  # the terminal, past Prefect's print capture (log_prints)
            sys.__stdout__.write(line + "\n")
            sys.__stdout__.flush()


def serialized(task: Any, root: str | Path) -> Any:
    """`task` (configured with with_options) made to run in a SERIALIZABLE transaction locked in the store."""
    locks = StoreLockManager(Path(root).resolve() / LOCK_DIR)
    task.cache_policy = task.cache_policy.configure(isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=locks)
    return task

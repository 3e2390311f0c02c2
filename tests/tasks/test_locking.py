"""The store's stage locks: one holder at a time across processes, a waiting run says what it waits for, and a
lock whose holder process died is broken instead of waited on forever."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tasks.locking import LOCK_DIR, StoreLockManager

KEY = "circuitflow-train-0123abcd"


def test_one_holder_and_the_waiter_says_what_it_waits_for(tmp_path, capfd):
    locks = StoreLockManager(tmp_path / LOCK_DIR)
    assert locks.acquire_lock(KEY, "run-a")
    info = json.loads((tmp_path / LOCK_DIR / f"{KEY}.lock").read_text())
    assert info["holder"] == "run-a" and info["pid"] == os.getpid()
    other = StoreLockManager(tmp_path / LOCK_DIR)  # a second run (our pid is alive, so the lock is live)
    assert not other.acquire_lock(KEY, "run-b", acquire_timeout=0.5)
    assert f"waiting for another run (pid {os.getpid()}) that is computing train/0123abcd" in capfd.readouterr().out
    locks.release_lock(KEY, "run-a")
    assert other.acquire_lock(KEY, "run-b", acquire_timeout=0.5) and other.is_lock_holder(KEY, "run-b")


def write_dead_holders_lock(tmp_path) -> Path:
    """The lock folder with KEY held by a process of this host that has exited (a killed run's lock)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / LOCK_DIR
    folder.mkdir()
    body = {"holder": "killed-run", "expiration": None, "pid": int(dead.stdout), "host": socket.gethostname()}
    (folder / f"{KEY}.lock").write_text(json.dumps(body))
    return folder


def test_a_lock_of_a_dead_process_is_broken(tmp_path):
    folder = write_dead_holders_lock(tmp_path)
    locks = StoreLockManager(folder)
    assert not locks.is_locked(KEY)
    assert locks.acquire_lock(KEY, "next-run", acquire_timeout=0.5)


def test_a_lock_of_another_host_is_not_broken(tmp_path):
    folder = tmp_path / LOCK_DIR
    folder.mkdir()
    body = {"holder": "remote", "expiration": None, "pid": 1 << 22, "host": "another-host"}
    (folder / f"{KEY}.lock").write_text(json.dumps(body))
    assert StoreLockManager(folder).is_locked(KEY)


def test_two_waiters_that_saw_the_same_dead_holder_leave_one_live_lock(tmp_path):
    folder = write_dead_holders_lock(tmp_path)
    first, second = StoreLockManager(folder), StoreLockManager(folder)
    seen_by_second = second._read(KEY)  # the second waiter reads the dead holder ...
    assert second._stale(seen_by_second)
    assert first.acquire_lock(KEY, "first-run", acquire_timeout=0.5)  # ... the first breaks it and takes the lock
    second._break(seen_by_second)  # ... then the second acts on what it read
    assert first.is_lock_holder(KEY, "first-run")
    assert not second.acquire_lock(KEY, "second-run", acquire_timeout=0.3)
    assert sorted(p.name for p in folder.iterdir()) == [f"{KEY}.lock"]  # no tomb left behind

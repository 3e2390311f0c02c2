"""Eighty SQL readers on a store while `circuitflow run --force mine` rebuilds the mined tables (feature
activations, top examples, stats) and what reads them in place: each reader opens its own read-only DuckDB
connection through storage.catalog.query (what `circuitflow sql` does), and every query it makes returns
the whole artifacts, never an error or a half-written table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage import catalog
from tests.faults.conftest import Reference, assert_nothing_partial, assert_same_run
from tests.faults.store_readers import ARTIFACT_VIEWS, check, reader_counts

READERS = 80
PAUSE_S = 0.5
"""Between a reader's rounds (a person or a dashboard re-querying), so the readers share the cores with the rerun."""


def read_once(store: Path, views: list[str], want: list[int]) -> None:
    """One query that counts the rows of every artifact view (one connection, as one `circuitflow sql`)."""
    sql = "select " + ", ".join(f"(select count(*) from {view})" for view in views)
    got = list(catalog.query(store, sql)[1][0])
    assert got == want, f"read {dict(zip(views, got, strict=True))}, want {dict(zip(views, want, strict=True))}"


def read_until(store: Path, want: dict[str, int], done: threading.Event, log: list[str | None]) -> None:
    """Query every view again and again, a pause between rounds, until `done` and once more after it;
    logs each round's failure (None when it read whole artifacts)."""
    while True:
        finished = done.is_set()
        log.append(check(read_once, store, list(want), list(want.values())))
        if finished:
            return
        done.wait(PAUSE_S)


@pytest.mark.prefect
def test_eighty_readers_during_a_forced_rerun_see_whole_artifacts(
    reference: Reference, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)
    config = reference.config_for(store)
    want = {view: n for view, n in reader_counts(store).items() if view in ARTIFACT_VIEWS}
    assert want == {v: n for v, n in reader_counts(reference.store).items() if v in ARTIFACT_VIEWS}
    assert {"feature_acts", "top_examples", "feature_stats"} <= want.keys()
    done, logs = threading.Event(), [[] for _ in range(READERS)]
    readers = [threading.Thread(target=read_until, args=(store, want, done, log)) for log in logs]
    for reader in readers:
        reader.start()
    env = {**os.environ, **prefect_api, "OMP_NUM_THREADS": "1"}
    try:
        rerun = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(config), "--force", "mine"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "mine" in rerun.stdout
    failures = [entry for log in logs for entry in log if entry is not None]
    assert not failures, f"{len(failures)} bad reads, the first: {failures[0]}"
    assert all(len(log) >= 2 for log in logs)  # each reader read during the rerun and after it
    assert_nothing_partial(store)
    assert_same_run(store, reference.plan, reference)

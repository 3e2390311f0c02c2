"""Two `circuitflow run` started together on one empty store (a scheduled run meeting a manual one): both
finish, every stage is computed by one of them only (the other waits for it and reuses it), and the store
ends equal to the uninterrupted reference run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import Reference, assert_nothing_partial, assert_same_run


def stage_rows(stdout: str) -> dict[tuple[str, str], str]:
    """The stage table of a run's output: (label, path) -> ran or cached."""
    rows = [line.split() for line in stdout.splitlines()]
    return {(r[0], r[3]): r[1] for r in rows if len(r) >= 4 and r[1] in ("ran", "cached")}


@pytest.mark.prefect
def test_two_runs_at_once_compute_each_stage_once(
    reference: Reference, prefect_api: dict[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = reference.config_for(store)
    env = {**os.environ, **prefect_api, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flows.cli", "run", str(config)]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    tables = [stage_rows(stdout) for stdout, _ in outs]
    assert tables[0].keys() == tables[1].keys() and len(tables[0]) >= 8, tables
    for row in tables[0]:
        statuses = sorted(t[row] for t in tables)
        assert statuses == ["cached", "ran"], f"{row}: {statuses} ({[o for o, _ in outs]})"
    assert_nothing_partial(store)
    assert not list((store / ".locks").glob("*.lock")), "a lock outlived its run"
    assert_same_run(store, json.loads((store / "runs" / "latest.json").read_text())["plan"], reference)
    # Whether one run waited depends on timing (seen in every local try); the message itself is tested in
    # tests/tasks/test_locking.py. Any wait it printed names the holder and the stage.
    waited = [line for stdout, _ in outs for line in stdout.splitlines() if line.startswith("waiting for")]
    assert all(re.fullmatch(r"waiting for another run \(pid \d+\) that is computing \w+/[0-9a-f]+", w) for w in waited)

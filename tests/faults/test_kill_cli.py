"""The real `circuitflow run` (Prefect) killed mid-training: nothing partial is visible, DuckDB reads whole
artifacts, and the rerun resumes (activations cached) to the uninterrupted run's artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import Reference, assert_nothing_partial, assert_same_run
from tests.faults.store_readers import assert_readers_see_whole_artifacts, reader_counts, seed_run_record


@pytest.fixture(scope="module")
def reference_counts(reference: Reference) -> dict[str, int]:
    return reader_counts(reference.store)


@pytest.mark.prefect
def test_cli_killed_mid_training_reruns_to_the_same_artifacts(
    reference: Reference, reference_counts: dict[str, int], prefect_api: dict[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = reference.config_for(store)
    seed_run_record(config, ["tokens"], fresh=True)
    env = {**os.environ, **prefect_api, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flows.cli", "run", str(config)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            while proc.poll() is None and not any(store.glob("train/*.partial/checkpoint.safetensors")):
                time.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already when it finished before the checkpoint
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and anything it started
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert_nothing_partial(store)
    counts = assert_readers_see_whole_artifacts(store, reference_counts)
    assert "tokens" in counts and "feature_stats" not in counts

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    status = {r[0]: r[1] for r in rows if len(r) >= 4 and r[1] in ("ran", "cached")}
    assert status.get("activations") == "cached" and status.get("train[0]") == "ran", done.stdout
    latest = json.loads((store / "runs" / "latest.json").read_text())
    assert_same_run(store, latest["plan"], reference)
    assert reader_counts(store) == reference_counts

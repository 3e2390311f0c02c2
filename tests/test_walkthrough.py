"""Runs examples/walkthrough.py on a trained default store: CIRCUITFLOW_STORE (default ./store).

Skipped only when that store has no finished run (no runs/latest.json); an incomplete store fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_walkthrough_runs_on_the_default_store(tmp_path):
    store = Path(os.environ.get("CIRCUITFLOW_STORE", ROOT / "store")).resolve()
    if not (store / "runs" / "latest.json").is_file():
        pytest.skip(f"{store}: no trained store (run `circuitflow run configs/default.yaml` or set CIRCUITFLOW_STORE)")
    env = {**os.environ, "CIRCUITFLOW_STORE": str(store), "CIRCUITFLOW_WALKTHROUGH_OUT": str(tmp_path)}
    env.setdefault("CIRCUITFLOW_THREADS", os.environ.get("CIRCUITFLOW_TEST_THREADS", "1"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "walkthrough.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for phrase in ("CE clean", "sum of the root's incoming edges", "frozen model: root moves", "pullback"):
        assert phrase in done.stdout
    assert (tmp_path / "graph.html").is_file()

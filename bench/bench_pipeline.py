"""Cached reruns of the whole pipeline: a cold run of a small bundled-model config, then the same
command again (every stage cached, Prefect not started), again through Prefect (`--prefect`), and
after changing one mining setting (mining and the stages that read its output rerun, nothing else). Each run is a fresh `circuitflow` process,
so interpreter start-up and imports are counted as a user would see them.

    .venv/bin/python -m bench.bench_pipeline [--quick]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "default.yaml"
SMALL = ["tokens.train_rows=96", "tokens.mine_rows=16", "train.epochs=1", "train.eval_ce_rows=4"]
"""The default experiment shrunk so the cold run takes about a minute on 2 CPU cores."""
CHANGE = "mine.top_k=7"
"""The setting changed for the last rerun."""
CACHED_TARGET_S = 5.0
"""A fully cached rerun should cost about a process start, not a pipeline."""


def circuitflow(store: Path, *extra: str) -> tuple[float, str]:
    """Run `circuitflow run` on the small config; seconds of wall time and its stdout."""
    sets = [arg for s in SMALL for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "flows.cli", "run", str(CONFIG), "--store", str(store), *sets, *extra]
    env = {**os.environ, "PREFECT_HOME": str(store.parent / "prefect-home")}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"circuitflow run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def ran(stdout: str) -> list[str]:
    """The stage tasks a run's summary table lists as ran (not cached)."""
    return [line.split()[0] for line in stdout.splitlines() if len(line.split()) > 2 and line.split()[1] == "ran"]


def touched(*overrides: str) -> list[str]:
    """The stages whose keys `overrides` change, from the plans (what a rerun must recompute), in order."""
    from core.config import load_config
    from tasks.plan import make_plan, stage_entries

    before, after = load_config(CONFIG, SMALL), load_config(CONFIG, [*SMALL, *overrides])
    old = {e.label: e.key for e in stage_entries(before, make_plan(before))}
    return [e.stage for e in stage_entries(after, make_plan(after)) if old.get(e.label) != e.key]


def run(quick: bool = False) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="cf-bench-pipeline-"))
    try:
        store = work / "store"
        cold, _ = circuitflow(store)
        cached, out_cached = circuitflow(store)
        via_prefect, out_prefect = circuitflow(store, "--prefect")
        changed, out_changed = circuitflow(store, "--set", CHANGE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recomputed = ran(out_cached) + ran(out_prefect)
    expected = touched(CHANGE)
    rows = [
        common.row("pipeline cold run (small default)", cold, "s", "", None, f"{' '.join(SMALL)}"),
        common.row("cached rerun", cached, "s", f"<= {CACHED_TARGET_S:g}", cached <= CACHED_TARGET_S and not recomputed,
             f"{cached / cold:.3f} of the cold run; recomputed: {recomputed or 'nothing'}"),
        common.row("cached rerun through Prefect", via_prefect, "s", "", None, f"{via_prefect / cold:.3f} of the cold run"),
        common.row("rerun after mine.top_k change", changed, "s", "only the touched stages rerun",
             [r.split("[")[0] for r in ran(out_changed)] == expected and "mine" in expected,
             f"ran: {', '.join(ran(out_changed)) or 'nothing'}; touched by the change: {', '.join(expected)}"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)

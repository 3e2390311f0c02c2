"""Run records: `<store>/runs/<stamp>-<mine key>-<rand>.json` per run (the `runs` SQL view), `runs/latest.json`
(the last run: its config and plan name the artifacts the catalog's views read), and
`runs/plans/<id>.json` (the last run of one plan and stage selection, for the fully cached fast path).
Plain JSON objects in and out; the one module that knows these paths."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from storage import layout

RUNS = "runs"
LATEST = "latest.json"
PLANS = "plans"


def latest_path(root: str | Path) -> Path:
    return Path(root) / RUNS / LATEST


def read_latest(root: str | Path) -> dict[str, Any] | None:
    """The last run's record, or None before the first run."""
    return _read(latest_path(root))


def read_plan_record(root: str | Path, run_id: str) -> dict[str, Any] | None:
    """The last run of the plan and stages named by `run_id`, or None."""
    return _read(Path(root) / RUNS / PLANS / f"{run_id}.json")


def record_files(root: str | Path) -> list[Path]:
    """Every run's own record, oldest first."""
    return sorted((Path(root) / RUNS).glob("2*.json"))


def write_record(root: str | Path, record: dict[str, Any], run_id: str, label: str) -> Path:
    """Write a run's record (atomically) as its own file, as the latest run and as its plan's last run."""
    runs = Path(root) / RUNS
    (runs / PLANS).mkdir(parents=True, exist_ok=True)
    path = runs / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}-{uuid.uuid4().hex[:6]}.json"
    layout.write_json_atomic(path, record)
    layout.write_json_atomic(runs / LATEST, record)
    layout.write_json_atomic(runs / PLANS / f"{run_id}.json", record)
    return path


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None

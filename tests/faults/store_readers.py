"""What readers of a killed store see: the run record that points the catalog views at the keys being built, the
rows DuckDB (storage.catalog.query) reads per view, and the debris killed writers leave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.config import load_config
from storage import catalog, layout
from tasks.plan import Plan

ARTIFACT_VIEWS = (
    "tokens", "vocab", "train_tokens", "feature_acts", "feature_stats", "top_examples", "feature_views", "feature_inputs",
)  # fmt: skip
"""Catalog views over stage artifacts (not the run records), compared by row count with the reference."""


def seed_run_record(config: Path, stages: list[str], fresh: bool = False) -> Plan:
    """A run record naming this config's plan (as a finished `circuitflow run --stages tokens` leaves it), so the
    catalog views point at the keys being built; returns the plan. `fresh`: keys from the code on disk now (what a
    new CLI process computes), not this process's cached code version."""
    from flows.pipeline import record_run
    from tasks.plan import make_plan

    cfg = load_config(config)
    with pytest.MonkeyPatch.context() as patch:
        if fresh:
            patch.setattr(layout, "code_version", layout.code_version.__wrapped__)
        plan = make_plan(cfg)
    record_run(cfg, plan, stages, [], 0.0, orchestrator="none")
    return plan


def reader_counts(store: Path) -> dict[str, int]:
    """Rows per artifact view (and per layer of train_metrics), read through the read-only SQL entry point."""
    names = catalog.view_sources(store)
    counts = {v: catalog.query(store, f"select count(*) from {v}")[1][0][0] for v in ARTIFACT_VIEWS if v in names}
    if "train_metrics" in names:
        rows = catalog.query(store, "select layer, count(*) from train_metrics group by layer")[1]
        counts.update({f"train_metrics[{layer}]": n for layer, n in rows})
    return counts


def assert_readers_see_whole_artifacts(store: Path, reference: dict[str, int]) -> dict[str, int]:
    """Every view DuckDB offers right now reads exactly the rows of the finished reference artifact."""
    counts = reader_counts(store)
    for view, n in counts.items():
        assert n == reference[view], f"view {view}: {n} rows after the kill, {reference[view]} when complete"
    return counts


def debris(store: Path) -> list[str]:
    """What killed writers left: temp dirs and hidden temp files, scratch dirs, displaced artifacts."""
    names = (p for p in store.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial") or ".old-" in p.name)
    return sorted(str(p.relative_to(store)) for p in names)


def check(fn: Any, *args: Any) -> str | None:
    """None when `fn(*args)` passes, else what failed (an assertion, or a reader that fails to read)."""
    try:
        fn(*args)
    except AssertionError as err:
        return str(err)
    except Exception as err:  # a reader that fails to read is a failure too
        return f"{type(err).__name__}: {err}"
    return None

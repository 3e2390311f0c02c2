"""DuckDB over the store: read-only views of every Parquet artifact of the latest run, a macro that
renders token context as text, and the locked-down SQL entry point behind `circuitflow sql`.

Views: tokens, vocab, train_tokens, feature_acts (hive-partitioned by layer), feature_stats,
top_examples, feature_views, train_metrics, feature_inputs, manifests, runs, sweep (the latest `circuitflow
sweep`), interventions (the latest experiments flow run).
Macro: context(row, pos[, before, after]).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import duckdb

from storage import layout, runs
from storage.duck import (
    MEMORY_LIMIT,
    QueryError,
    mine_views,
    one_line,
    open_views,
    parquet,
    quote,
    tokens_views,
)
from storage.feature_inputs import feature_inputs_views
from storage.interventions import interventions_views

TIMEOUT_S = 30.0
"""Default wall-clock limit of one `circuitflow sql` query (`--timeout` raises it)."""
MAX_ROWS = 1_000_000
"""Default most result rows a query may return (`--max-rows`); the rows are held in memory to print."""


def _latest_run(root: Path) -> dict | None:
    return runs.read_latest(root)


def trace_views(trace_dir: str | Path) -> dict[str, str]:
    """`nodes` and `edges` views over a trace stage directory (none when it has no tables; storage.graphs
    writes them)."""
    trace_dir = Path(trace_dir).resolve()
    return {
        v: parquet(trace_dir / f"{v}.parquet") for v in ("nodes", "edges") if (trace_dir / f"{v}.parquet").is_file()
    }


def train_views(root: Path, train: dict[Any, str]) -> dict[str, str]:
    """`train_metrics`: every layer's metrics.parquet with a layer column."""
    parts = []
    for layer, key in sorted(((int(k), v) for k, v in train.items())):
        path = layout.stage_dir(root, "train", key) / "metrics.parquet"
        if path.is_file():
            parts.append(f"select {layer}::INTEGER as layer, * from read_parquet({quote(path)})")
    return {"train_metrics": " union all by name ".join(parts)} if parts else {}


def manifest_view(root: Path, run: dict[str, Any]) -> dict[str, str]:
    """`manifests`: one row per complete stage directory of a run (stage, key, created, seconds,
    manifest as JSON): the plan's stages plus any other stage the run recorded (e.g. evaluate)."""
    dirs: list[Path] = []
    for name, value in run.get("plan", {}).items():
        stage = "tokens" if name.startswith("tokens_") else name
        for key in value.values() if isinstance(value, dict) else [value]:
            if key:
                dirs.append(layout.stage_dir(root, stage, str(key)))
    recorded = [s for s in run.get("stages", []) if isinstance(s, dict) and s.get("stage") and s.get("key")]
    dirs += [layout.stage_dir(root, str(s["stage"]), str(s["key"])) for s in recorded]
    files: list[Path] = []
    for d in dirs:
        file = d.resolve() / layout.MANIFEST
        if file.is_file() and file not in files and root in file.parents:
            files.append(file)
    if not files:
        return {}
    listed = "[" + ", ".join(quote(p) for p in files) + "]"
    return {
        "manifests": (
            "select json_extract_string(content, '$.stage') as stage, json_extract_string(content, '$.key') as key, "
            "json_extract_string(content, '$.created') as created, "
            "try_cast(json_extract(content, '$.seconds') as double) as seconds, content::JSON as manifest "
            f"from read_text({listed})"
        )
    }


def run_views(root: Path) -> dict[str, str]:
    """`runs`: every run record under <store>/runs/."""
    records = runs.record_files(root)
    if not records:
        return {}
    files = "[" + ", ".join(quote(p) for p in records) + "]"
    return {
        "runs": (
            "select created, seconds, plan, stages "
            f"from read_json({files}, format='auto', maximum_object_size=67108864)"
        )
    }


SWEEP_LATEST = Path("sweep") / "latest.json"
"""Under the store: names the sweep the `sweep` view shows, the last one `circuitflow sweep` ran."""
SWEEP_TABLE = "sweep.parquet"
"""The table of a sweep stage directory: one row per point."""


def sweep_views(root: Path) -> dict[str, str]:
    """`sweep`: the table of the latest sweep (kind, settings, L0, FVU, CE ... per point)."""
    pointer = Path(root) / SWEEP_LATEST
    if not pointer.is_file():
        return {}
    folder = layout.stage_dir(root, "sweep", str(json.loads(pointer.read_text()).get("key")))
    if not layout.is_complete(folder) or not (folder / SWEEP_TABLE).is_file():
        return {}
    return {"sweep": parquet(folder.resolve() / SWEEP_TABLE)}


def view_sources(root: str | Path) -> dict[str, str]:
    """View name -> SQL source over the artifacts of the latest run (`<store>/runs/latest.json`)."""
    root = Path(root).resolve()
    run = _latest_run(root)
    if run is None:
        return {**sweep_views(root), **interventions_views(root)}
    plan = run["plan"]
    views: dict[str, str] = {}
    views.update(tokens_views(layout.stage_dir(root, "tokens", plan["tokens_mine"])))
    views.update(tokens_views(layout.stage_dir(root, "tokens", plan["tokens_train"]), prefix="train_"))
    if plan.get("mine") and layout.is_complete(layout.stage_dir(root, "mine", plan["mine"])):
        views.update(mine_views(layout.stage_dir(root, "mine", plan["mine"])))
    views.update(train_views(root, plan.get("train") or {}))
    if plan.get("trace") and layout.is_complete(layout.stage_dir(root, "trace", plan["trace"])):
        views.update(trace_views(layout.stage_dir(root, "trace", plan["trace"])))
    if plan.get("feature_inputs") and layout.is_complete(
        layout.stage_dir(root, "feature_inputs", plan["feature_inputs"])
    ):
        views.update(feature_inputs_views(layout.stage_dir(root, "feature_inputs", plan["feature_inputs"])))
    views.update(manifest_view(root, run))
    views.update(run_views(root))
    views.update(sweep_views(root))
    views.update(interventions_views(root))
    return views


def connect(
    root: str | Path, sources: dict[str, str] | None = None, memory_limit: str = MEMORY_LIMIT
) -> duckdb.DuckDBPyConnection:
    """A read-only connection (storage.duck) with a view per artifact of the latest run, or the given `sources`
    (view name -> SQL), e.g. to read a stage directory that is not published yet."""
    views = view_sources(root) if sources is None and Path(root).is_dir() else (sources or {})
    return open_views(root, views, memory_limit)


def check_read_only(sql: str) -> None:
    """Refuse statements that write, attach, copy out, install or load: the SQL entry point only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {one_line(exc)}") from None
    if not statements:
        raise QueryError("empty SQL; give a query such as: select count(*) from tokens")
    for statement in statements:
        if statement.type != duckdb.StatementType.SELECT:
            kind = {"load": "install/load"}.get(statement.type.name.lower(), statement.type.name.lower())
            raise QueryError(
                f"refused: {kind} statements are not allowed; the SQL entry point is read-only (use select)"
            )


def query(
    root: str | Path, sql: str, timeout: float = TIMEOUT_S, memory_limit: str = MEMORY_LIMIT, max_rows: int = MAX_ROWS
) -> tuple[list[str], list[tuple]]:
    """Run one read-only query and return (column names, rows): stopped after `timeout` seconds, at
    `memory_limit` (DuckDB's memory and spill), or past `max_rows` result rows."""
    check_read_only(sql)
    con = connect(root, memory_limit=memory_limit)
    timer = threading.Timer(timeout, con.interrupt)
    timer.start()
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description or []]
        return names, _fetch(cursor, max_rows)
    except duckdb.PermissionException as exc:
        raise QueryError(
            f"refused: {one_line(exc)}; only files inside the store can be read: query the views "
            f"({', '.join(sorted(view_sources(root))) or 'none yet'})"
        ) from None
    except duckdb.InterruptException:
        raise QueryError(
            f"the query ran past its time limit of {timeout:g} s; raise it with --timeout SECONDS"
        ) from None
    except duckdb.OutOfMemoryException:
        raise QueryError(
            f"the query needs more than its memory limit of {memory_limit}; raise it with --memory-limit SIZE "
            "(e.g. 8GB) or narrow the query"
        ) from None
    except duckdb.CatalogException as exc:
        if _latest_run(Path(root).resolve()) is None:
            raise QueryError(
                f"no run has finished in the store {root} yet; its views appear when `circuitflow run` finishes"
            ) from None
        raise QueryError(f"SQL error: {one_line(exc)}") from None
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {one_line(exc)}") from None
    finally:
        timer.cancel()
        con.close()


def _fetch(cursor: duckdb.DuckDBPyConnection, max_rows: int) -> list[tuple]:
    rows: list[tuple] = []
    while chunk := cursor.fetchmany(10_000):
        rows.extend(chunk)
        if len(rows) > max_rows:
            raise QueryError(
                f"the query returns more than {max_rows} rows; add a LIMIT or raise the cap with --max-rows N"
            )
    return rows

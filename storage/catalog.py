"""DuckDB over the store: read-only views of every Parquet artifact, and the SQL entry point."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from core.errors import UserError
from storage import layout


class QueryError(UserError):
    """A refused or failed SQL statement, in one line."""


def _latest_run(root: Path) -> dict | None:
    latest = root / "runs" / "latest.json"
    return json.loads(latest.read_text()) if latest.is_file() else None


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def view_sources(root: str | Path) -> dict[str, str]:
    """View name -> SQL source over the artifacts of the latest run."""
    root = Path(root).resolve()
    run = _latest_run(root)
    views: dict[str, str] = {}
    if run is None:
        return views
    plan = run["plan"]
    mine_tokens = layout.stage_dir(root, "tokens", plan["tokens_mine"])
    if layout.is_complete(mine_tokens):
        views["tokens"] = f"select * from read_parquet({_quote(mine_tokens / 'tokens.parquet')})"
        views["vocab"] = f"select * from read_parquet({_quote(mine_tokens / 'vocab.parquet')})"
    train_tokens = layout.stage_dir(root, "tokens", plan["tokens_train"])
    if layout.is_complete(train_tokens):
        views["train_tokens"] = f"select * from read_parquet({_quote(train_tokens / 'tokens.parquet')})"
    runs = sorted((root / "runs").glob("2*.json"))
    if runs:
        files = "[" + ", ".join(_quote(p) for p in runs) + "]"
        views["runs"] = (
            "select created, seconds, plan, stages "
            f"from read_json({files}, format='auto', maximum_object_size=67108864)"
        )
    return views


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per artifact, locked to read the store only."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise QueryError(f"store {root} does not exist; run `circuitflow run CONFIG` first or pass --store")
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(f"SET allowed_directories=[{_quote(root)}]")
    con.execute("SET enable_external_access=false")
    for name, source in view_sources(root).items():
        con.execute(f"create view {name} as {source}")
    con.execute("SET lock_configuration=true")
    return con


def check_read_only(sql: str) -> None:
    """Refuse statements that write, attach, copy out, install or load: the SQL entry point only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise QueryError("empty SQL; give a query such as: select count(*) from tokens")
    for statement in statements:
        if statement.type != duckdb.StatementType.SELECT:
            kind = statement.type.name.lower()
            raise QueryError(f"refused: {kind} statements are not allowed; the SQL entry point is read-only (use select)")


def query(root: str | Path, sql: str):
    """Run one read-only query and return (column names, rows)."""
    check_read_only(sql)
    con = connect(root)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()

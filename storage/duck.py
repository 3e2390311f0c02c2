"""A read-only DuckDB connection locked to one store, over the views a caller names (stage directories' Parquet
files), and the views of the tokens and mine artifacts. The stages that read their own tables through SQL use
this module; storage.catalog adds the store-wide views of the latest run and the `circuitflow sql` entry point."""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from pathlib import Path

import duckdb

from core.errors import UserError
from storage import layout


class QueryError(UserError):
    """A refused or failed SQL statement, in one line."""


MEMORY_LIMIT = "2GB"
"""Default DuckDB memory limit of one query, also the most it may spill to disk (`--memory-limit`)."""


CONTEXT_MACRO = """
create macro context(r, p, before := 12, after := 4) as (
    select string_agg(case when t.i = p then '«' || v.text || '»' else v.text end, '' order by t.i)
    from (
        select unnest(tokens) as token, unnest(range(len(tokens))) as i from tokens where row = r
    ) t join vocab v on v.token = t.token
    where t.i between p - before and p + after
)"""
"""context(row, pos): the text of tokens[pos-before .. pos+after] of a mining row, the token at pos
in «guillemets»."""

LISTING_TRIES = 20
"""Listings of a mine artifact's feature_acts files tried before a query gives up (each is repeated only
when the artifact was replaced while it was listed)."""

EMPTY_FEATURE_ACTS = (
    "select * from (values (0, 0, 0, 0::smallint, 0::float)) t(layer, feature, row, pos, act) where false"
)


def quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def parquet(path: Path) -> str:
    return f"select * from read_parquet({quote(path)})"


def tokens_views(tokens_dir: Path, prefix: str = "") -> dict[str, str]:
    """`tokens` and `vocab` views over a complete tokens stage directory (none when incomplete)."""
    tokens_dir = Path(tokens_dir).resolve()
    if not layout.is_complete(tokens_dir):
        return {}
    views = {f"{prefix}tokens": parquet(tokens_dir / "tokens.parquet")}
    if not prefix:
        views["vocab"] = parquet(tokens_dir / "vocab.parquet")
    return views


def mine_views(mine_dir: Path) -> dict[str, str]:
    """feature_acts, feature_stats, top_examples and feature_views over a mine stage directory
    (finished or still being written: the pipeline renders dashboards before publishing it)."""
    mine_dir = Path(mine_dir).resolve()
    views: dict[str, str] = {}
    files = feature_acts_files(mine_dir)
    if files:
        listed = "[" + ", ".join(quote(f) for f in files) + "]"
        views["feature_acts"] = (
            "select layer, feature, row, pos, act "
            f"from read_parquet({listed}, hive_partitioning=true, hive_types={{'layer': INTEGER}})"
        )
    elif (mine_dir / "feature_stats.parquet").is_file():
        views["feature_acts"] = EMPTY_FEATURE_ACTS
    for name in ("feature_stats", "top_examples", "feature_views"):
        if (mine_dir / f"{name}.parquet").is_file():
            views[name] = parquet(mine_dir / f"{name}.parquet")
    return views


def feature_acts_files(mine_dir: Path) -> list[Path]:
    """The feature_acts files of the mine artifact at `mine_dir`, listed whole. A forced rerun swaps a new
    artifact in and then removes the old one, so a listing that began in the old one would see its files
    vanish: the listing is repeated until the folder at `mine_dir` was the same before and after it (the
    view then names the files, which a query opens by path in whichever artifact is in place)."""
    for _ in range(LISTING_TRIES):
        before = _identity(mine_dir)
        files = sorted(mine_dir.glob("feature_acts/layer=*/*.parquet"))
        if _identity(mine_dir) == before:
            return files
    raise QueryError(f"{mine_dir} was replaced {LISTING_TRIES} times while it was read; rerun the query")


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = folder.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def open_views(
    root: str | Path, sources: dict[str, str], memory_limit: str = MEMORY_LIMIT
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per artifact, locked to read the store only.

    DuckDB also allows its temp_directory (by default `<cwd>/.tmp`), so it spills into a private fresh
    directory instead, removed with the connection (and at exit; those of killed processes at the next connect).

    `sources`: view name -> SQL (e.g. tokens_views + mine_views of a stage directory not published yet);
    every file it names must lie inside the store."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise QueryError(f"store {root} does not exist; run `circuitflow run CONFIG` first or pass --store")
    spill = _spill_dir()
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False, "temp_directory": spill}
    con = duckdb.connect(":memory:", config=config)
    weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
    try:
        con.execute(f"SET allowed_directories=[{quote(root)}]")
        con.execute("SET enable_external_access=false")
        views = sources
        for name, source in views.items():
            con.execute(f"create view {name} as {source}")
        if "tokens" in views and "vocab" in views:
            con.execute(CONTEXT_MACRO)
        _set_memory_limit(con, memory_limit)
        con.execute("SET lock_configuration=true")
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"cannot open the store's views: {one_line(exc)}") from None
    return con


SPILL_PREFIX = "circuitflow-duckdb"
"""Name of DuckDB's private spill directories in the system temp folder (followed by a layout temp suffix)."""


def _spill_dir() -> str:
    """A fresh owner-only directory for DuckDB to spill into, after removing those of dead processes."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{SPILL_PREFIX}.tmp-*"):
        if layout.is_stale(stale):
            shutil.rmtree(stale, ignore_errors=True)
    path = layout.temp_path(base / SPILL_PREFIX, hidden=False)
    path.mkdir(mode=0o700)
    return str(path)


def _set_memory_limit(con: duckdb.DuckDBPyConnection, limit: str) -> None:
    try:
        con.execute(f"SET memory_limit={quote(limit)}")
        con.execute(f"SET max_temp_directory_size={quote(limit)}")
    except duckdb.Error:
        raise QueryError(f"--memory-limit {limit!r}: not a size; give one such as 2GB or 500MB") from None


_SET_HINT = re.compile(r'\s*Use "SET [^"]*"[^.]*\.')
"""DuckDB's advice to change a setting, which the locked connection refuses."""


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    if _SET_HINT.search(line):
        line = _SET_HINT.sub("", line) + " Simplify the query (settings cannot be changed here)."
    return line

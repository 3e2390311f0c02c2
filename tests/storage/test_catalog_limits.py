"""`circuitflow sql` is bounded: a time limit (default at most 60 s), a memory limit, a row cap, each reported in one
line naming the flag that raises it; DuckDB errors never suggest a SET the locked connection refuses."""

from __future__ import annotations

import inspect
import time

import pytest

from storage import catalog


def test_defaults_are_bounded():
    params = inspect.signature(catalog.query).parameters
    assert params["timeout"].default == catalog.TIMEOUT_S <= 60
    assert params["memory_limit"].default == catalog.MEMORY_LIMIT
    assert params["max_rows"].default == catalog.MAX_ROWS


def test_a_runaway_query_stops_at_the_timeout(tmp_path):
    start = time.perf_counter()
    with pytest.raises(catalog.QueryError, match=r"time limit of 0\.5 s; raise it with --timeout"):
        catalog.query(tmp_path, "select count(*) from range(100000) a, range(100000) b, range(100000) c", timeout=0.5)
    assert time.perf_counter() - start < 10


def test_memory_and_rows_are_capped(tmp_path):
    big_distinct = "select count(distinct a.range * 1000000 + b.range) from range(3000) a, range(3000) b"
    with pytest.raises(catalog.QueryError, match=r"memory limit of 20MB; raise it with --memory-limit"):
        catalog.query(tmp_path, big_distinct, memory_limit="20MB")
    with pytest.raises(catalog.QueryError, match=r"more than 1000 rows; add a LIMIT or raise the cap with --max-rows"):
        catalog.query(tmp_path, "select * from range(5000)", max_rows=1000)
    assert len(catalog.query(tmp_path, "select * from range(1000)", max_rows=1000)[1]) == 1000


def test_depth_limit_error_does_not_suggest_a_refused_set(tmp_path):
    with pytest.raises(catalog.QueryError) as err:
        catalog.query(tmp_path, "select " + "(" * 1100 + "1" + ")" * 1100)
    assert "Max expression depth" in str(err.value) and "SET" not in str(err.value)

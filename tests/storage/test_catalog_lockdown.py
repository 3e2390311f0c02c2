"""The SQL entry point's sandbox beyond the store itself: DuckDB's spill directory is private (not `<cwd>/.tmp`,
which DuckDB would otherwise allow reading) and removed with the connection; and the query commands import
neither torch nor transformer_lens."""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from storage import catalog, duck, layout, tables

REPO = Path(__file__).resolve().parents[2]


def tiny_store(root: Path) -> Path:
    """A store whose latest run names one tokens artifact."""
    folder = layout.stage_dir(root, "tokens", "tok")
    tables.write_table(tables.tokens_table(np.arange(12, dtype=np.int32).reshape(3, 4)), folder / "tokens.parquet")
    tables.write_table(tables.vocab_table([str(i) for i in range(12)]), folder / "vocab.parquet")
    layout.write_json_atomic(folder / layout.MANIFEST, {"stage": "tokens", "key": "tok"})
    (root / "runs").mkdir()
    run = {"plan": {"tokens_train": "tok", "tokens_mine": "tok", "train": {}}, "stages": []}
    (root / "runs" / "latest.json").write_text(json.dumps(run))
    return root


def test_duckdb_temp_directory_in_the_working_directory_is_not_readable(tmp_path, monkeypatch):
    store = tiny_store(tmp_path / "store")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("not in the store\n")
    monkeypatch.chdir(tmp_path)
    assert catalog.query(store, "select count(*) from tokens")[1] == [(3,)]  # the store still reads
    with pytest.raises(catalog.QueryError, match=r"secret\.txt.*only files inside the store can be read"):
        catalog.query(store, f"select content from read_text('{tmp_path}/.tmp/secret.txt')")


def test_the_spill_directory_is_private_and_goes_with_the_connection(tmp_path, monkeypatch):
    store = tiny_store(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    con = catalog.connect(store)
    spill = Path(con.execute("select current_setting('temp_directory')").fetchone()[0])
    allowed = con.execute("select current_setting('allowed_directories')").fetchone()[0]
    assert spill.is_dir() and stat.S_IMODE(spill.stat().st_mode) == 0o700
    assert tmp_path not in spill.parents and store.resolve() not in spill.parents
    assert sorted(Path(p).resolve() for p in allowed) == sorted([store.resolve(), spill.resolve()])
    con.close()
    del con
    gc.collect()
    assert not spill.exists()


def test_spill_directories_of_killed_processes_are_removed_at_the_next_connect(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp folder, for this test
    store = tiny_store(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = layout.temp_path(tmp_path / duck.SPILL_PREFIX, hidden=False)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}@", f"-{dead.pid}@"))
    (stale / "duckdb_temp_block").parent.mkdir()
    (stale / "duckdb_temp_block").write_bytes(b"spilled")
    mine.mkdir()  # a live process's (this one's)
    con = catalog.connect(store)
    spill = Path(con.execute("select current_setting('temp_directory')").fetchone()[0])
    assert spill.parent == tmp_path and spill.name.startswith(f"{duck.SPILL_PREFIX}.tmp-{os.getpid()}@")
    assert not stale.exists() and mine.is_dir()
    con.close()


def test_query_commands_import_no_model_stack():
    """`circuitflow sql` and `circuitflow feature` (and the storage modules they read through) stay light."""
    modules = ["flows.commands.sql", "flows.commands.feature", "storage.catalog", "storage.dashboard",
               "storage.tables", "storage.graphs"]  # fmt: skip
    probe = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
    probe += "print([m for m in ('torch', 'transformer_lens', 'prefect') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

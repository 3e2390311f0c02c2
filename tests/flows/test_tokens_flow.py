"""The tokens stage end to end through the Prefect flow: ran, then cached (also without Prefect's database)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import yaml

from flows.cli import main as cli_main
from flows.pipeline import pipeline
from storage import layout
from storage.tables import read_tokens
from tests.corpora import write_corpus

pytestmark = pytest.mark.prefect


def _doc_ids(rows: np.ndarray) -> set[int]:
    """Numbers of the documents whose marker appears in byte-tokenised rows."""
    text = bytes(int(t) for t in rows[:, 1:].reshape(-1) if t < 256).decode(errors="replace")
    return {int(m) for m in re.findall(r"Document (\d+)\.", text)}


@pytest.fixture
def tiny_config(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 60)
    cfg = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 40, "mine_rows": 8, "holdout_fraction": 0.2},
        "activations": {"layers": [0, 1]},
        "store": {"root": str(tmp_path / "store")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "store"


def test_tokens_stage_runs_then_caches(prefect_harness, tiny_config):
    config, store = tiny_config
    first = pipeline(config=str(config), stages=["tokens"])
    assert [s["status"] for s in first] == ["ran", "ran"]
    train_dir, mine_dir = (layout.stage_dir(store, "tokens", s["key"]) for s in first)
    rows = read_tokens(train_dir / "tokens.parquet")
    assert rows.shape == (40, 32) and (rows[:, 0] == 256).all()
    held = read_tokens(mine_dir / "tokens.parquet")
    assert held.shape == (8, 32)
    # Held-out rows come from other documents than the training rows.
    assert not _doc_ids(held) & _doc_ids(rows)
    assert _doc_ids(held) and _doc_ids(rows)

    second = pipeline(config=str(config), stages=["tokens"])
    assert [s["status"] for s in second] == ["cached", "cached"]
    assert np.array_equal(read_tokens(train_dir / "tokens.parquet"), rows)

    # Prefect's persisted results are gone (as when its database is lost): the manifest still counts.
    shutil.rmtree(store / ".prefect-results")
    third = pipeline(config=str(config), stages=["tokens"])
    assert [s["status"] for s in third] == ["cached", "cached"]

    forced = pipeline(config=str(config), stages=["tokens"], force=["tokens"])
    assert [s["status"] for s in forced] == ["ran", "ran"]
    assert np.array_equal(read_tokens(train_dir / "tokens.parquet"), rows)


def test_cli_run_and_sql(prefect_harness, tiny_config, capsys):
    config, store = tiny_config
    assert cli_main(["run", str(config), "--stages", "tokens"]) == 0
    out = capsys.readouterr().out
    assert "tokens" in out and "ran" in out
    assert cli_main(["run", str(config), "--stages", "tokens"]) == 0
    assert out.count("cached") == 0 and "cached" in capsys.readouterr().out
    assert cli_main(["sql", "select count(*) as n from tokens", "--store", str(store), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "8"]


def test_cli_bad_input_is_one_line(tiny_config, capsys):
    config, store = tiny_config
    cases = [
        (["run", str(config), "--set", "trian.lr=1"], "trian: unknown key; did you mean 'train'?"),
        (["run", str(config), "--set", "activations.layers=[0,7]"], "layer 7 is out of range"),
        (["run", str(config), "--stages", "tokenz"], "--stages 'tokenz': unknown stage"),
        (["run", str(config) + ".missing"], "config file not found"),
        (["sql", "drop table tokens", "--store", str(store)], "refused: drop statements are not allowed"),
        (["sql", "select 1", "--store", str(store)], "does not exist; run `circuitflow run CONFIG` first"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not store.exists()

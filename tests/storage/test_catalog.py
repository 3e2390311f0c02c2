"""The DuckDB catalog: its views answer exactly what pyarrow reads from the same files, plain DuckDB
reads the files too, the context macro renders the right tokens, and the SQL entry point refuses
anything but reading the store, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from core import mining
from core.views import ViewRows
from flows.cli import main as cli
from storage import catalog, layout, tables
from tasks.feature_chunks import iter_feature_chunks

PLAN = {
    "tokens_train": "toktrain",
    "tokens_mine": "tokmine",
    "activations": "acts",
    "train": {"0": "train0", "3": "train3"},
    "mine": "minekey",
    "trace": "tracekey",
}
D_SAE = {0: 40, 3: 24}
CONTEXT = 16
VOCAB = [f"w{i}" if i % 7 else f" it's{i}\n" for i in range(60)]


def _manifest(path: Path, stage: str, key: str) -> None:
    layout.write_json_atomic(
        path / layout.MANIFEST, {"stage": stage, "key": key, "created": "2026-11-24", "seconds": 1.5}
    )


def make_store(root: Path, seed: int = 0) -> dict:
    """A small store with every artifact the catalog reads, from seeded random non-zeros.
    Returns the tokens and the non-zeros per layer for independent checks."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(VOCAB), size=(10, CONTEXT)).astype(np.int32)
    for name, split_rows in (("tokmine", rows), ("toktrain", rows[:4])):
        d = layout.stage_dir(root, "tokens", name)
        tables.write_table(tables.tokens_table(split_rows), d / "tokens.parquet")
        tables.write_table(tables.vocab_table(VOCAB), d / "vocab.parquet")
        _manifest(d, "tokens", name)
    for layer, key in PLAN["train"].items():
        d = layout.stage_dir(root, "train", key)
        steps = np.arange(5)
        metrics = pa.table({"step": steps, "loss": 1.0 / (steps + 1 + int(layer)), "l0": steps * 2.0})
        tables.write_table(metrics, d / "metrics.parquet")
        _manifest(d, "train", key)
    mine = layout.stage_dir(root, "mine", PLAN["mine"])
    nonzeros = {}
    with (
        tables.TableSink(mine / "feature_stats.parquet", tables.FEATURE_STATS_SCHEMA) as stats_sink,
        tables.TableSink(mine / "top_examples.parquet", tables.TOP_EXAMPLES_SCHEMA) as top_sink,
        tables.TableSink(mine / "feature_views.parquet", tables.FEATURE_VIEWS_SCHEMA) as view_sink,
    ):
        for layer, d_sae in D_SAE.items():
            nz = _random_layer(rng, rows.shape[0], d_sae, dead=d_sae - 1)
            nonzeros[layer] = nz
            buffer = mining.RunBuffer(d_sae, max_nonzeros=nz.size // 2 + 1 if layer == 0 else 10**9)  # layer 0: 2 parts
            runs = [r for r in [buffer.add(nz), buffer.flush()] if r is not None]
            for part, run in enumerate(runs):
                tables.write_feature_acts(
                    tables.feature_acts_table(*run), tables.feature_acts_path(mine, layer, part), row_group_size=64
                )
            parts = sorted((mine / "feature_acts" / f"layer={layer}").glob("*.parquet"))
            for first, stop, chunk in iter_feature_chunks(parts, d_sae, max_nonzeros=100):
                stats, examples = mining.summarize_features(chunk, first, stop, 5, 3, 2, 6)
                stats_sink.write(tables.feature_stats_table(layer, stats, int(rows.size)))
                top_sink.write(tables.top_examples_table(layer, examples))
            view_sink.write(tables.feature_views_table(layer, _views(d_sae)))
    _manifest(mine, "mine", PLAN["mine"])
    runs_dir = root / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    record = {"created": "2026-11-24T10:00:00", "seconds": 3.0, "config": {}, "plan": PLAN, "stages": []}
    layout.write_json_atomic(runs_dir / "20261124T100000-minekey.json", record)
    layout.write_json_atomic(runs_dir / "latest.json", record)
    return {"rows": rows, "nonzeros": nonzeros}


def _random_layer(rng, n_rows: int, d_sae: int, dead: int) -> mining.Nonzeros:
    mask = rng.random((n_rows, CONTEXT, d_sae)) < 0.25
    mask[..., dead] = False
    r, p, f = np.nonzero(mask)
    act = (rng.random(r.shape[0]) * 5).astype(np.float32)
    return mining.Nonzeros(f.astype(np.int32), r.astype(np.int32), p.astype(np.int16), act)


def _views(d_sae: int) -> ViewRows:
    n = d_sae * 2
    feature = torch.arange(d_sae).repeat_interleave(2)
    token = torch.arange(n) % len(VOCAB)
    minus = torch.full((n,), -1)
    return ViewRows("deembed", feature, torch.arange(n) % 2, token, minus, minus, minus, torch.linspace(1, -1, n))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("store")
    return root, make_store(root)


def _arrow_acts(root: Path) -> pa.Table:
    mine = layout.stage_dir(root, "mine", PLAN["mine"]) / "feature_acts"
    return ds.dataset(mine, format="parquet", partitioning="hive").to_table()


def _sorted_columns(table: pa.Table, names: list[str]) -> list[np.ndarray]:
    table = table.sort_by([(n, "ascending") for n in names[:-1]])
    return [table.column(n).to_numpy() for n in names]


def test_the_catalog_has_a_view_per_artifact(store):
    root, _ = store
    assert set(catalog.view_sources(root)) == {
        "tokens", "vocab", "train_tokens", "feature_acts", "feature_stats", "top_examples", "feature_views",
        "train_metrics", "manifests", "runs",
    }  # fmt: skip


def test_feature_acts_through_duckdb_equal_pyarrow(store):
    root, data = store
    con = catalog.connect(root)
    names = ["layer", "feature", "row", "pos", "act"]
    got = con.sql(f"select {', '.join(names)} from feature_acts order by layer, feature, row, pos").to_arrow_table()
    expected = _arrow_acts(root)
    for a, b in zip(_sorted_columns(got, names), _sorted_columns(expected, names), strict=True):
        np.testing.assert_array_equal(a, b)
    # and both equal the non-zeros that were written
    for layer, nz in data["nonzeros"].items():
        one = con.execute(
            "select row, pos, act from feature_acts where layer = ? and feature = 3 order by row, pos", [layer]
        ).fetchall()
        sel = nz.feature == 3
        assert one == list(zip(nz.row[sel].tolist(), nz.pos[sel].tolist(), nz.act[sel].tolist(), strict=True))
    grouped = con.execute(
        "select layer, count(*), sum(act::double) from feature_acts group by layer order by layer"
    ).fetchall()
    for (layer, count, total), (lay, nz) in zip(grouped, sorted(data["nonzeros"].items()), strict=True):
        assert layer == lay and count == nz.size
        assert total == pytest.approx(nz.act.astype(np.float64).sum(), rel=1e-12)


@pytest.mark.parametrize("name", ["feature_stats", "top_examples", "feature_views"])
def test_mined_tables_through_duckdb_equal_pyarrow(store, name):
    root, _ = store
    file = layout.stage_dir(root, "mine", PLAN["mine"]) / f"{name}.parquet"
    expected = pq.read_table(file)
    got = catalog.connect(root).sql(f"select * from {name}").to_arrow_table()
    assert got.column_names == expected.column_names
    assert got.to_pylist() == expected.to_pylist()


def test_tokens_vocab_and_train_metrics_equal_their_files(store):
    root, data = store
    con = catalog.connect(root)
    tokens = con.execute("select row, tokens from tokens order by row").fetchall()
    assert [t for _, t in tokens] == data["rows"].tolist()
    assert [t for _, t in con.execute("select token, text from vocab order by token").fetchall()] == VOCAB
    assert con.execute("select count(*) from train_tokens").fetchall() == [(4,)]
    metrics = con.execute("select layer, step, loss from train_metrics order by layer, step").fetchall()
    expected = []
    for layer, key in sorted(PLAN["train"].items(), key=lambda kv: int(kv[0])):
        table = pq.read_table(layout.stage_dir(root, "train", key) / "metrics.parquet")
        expected += [
            (int(layer), s, loss) for s, loss in zip(table["step"].to_pylist(), table["loss"].to_pylist(), strict=True)
        ]
    assert metrics == expected


def test_runs_and_manifests(store):
    root, _ = store
    con = catalog.connect(root)
    assert con.execute("select count(*) from runs").fetchall() == [(1,)]
    stages = con.execute("select stage, key, seconds from manifests order by stage, key").fetchall()
    assert ("mine", "minekey", 1.5) in stages and ("train", "train3", 1.5) in stages
    assert len(stages) == 5  # 2 tokens + 2 train + mine; activations and trace are absent


def test_plain_duckdb_reads_the_files_with_hive_partitioning(store):
    root, data = store
    glob = layout.stage_dir(root, "mine", PLAN["mine"]) / "feature_acts" / "*" / "*.parquet"
    con = duckdb.connect()
    got = con.execute(
        f"select layer, count(*) from read_parquet('{glob}', hive_partitioning=true) group by layer order by layer"
    ).fetchall()
    assert got == [(layer, nz.size) for layer, nz in sorted(data["nonzeros"].items())]


def test_one_feature_is_a_few_row_groups(store):
    root, data = store
    for path in (layout.stage_dir(root, "mine", PLAN["mine"]) / "feature_acts").rglob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        spans = [
            (meta.row_group(i).column(0).statistics.min, meta.row_group(i).column(0).statistics.max)
            for i in range(meta.num_row_groups)
        ]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # sorted: groups prune by feature
        for feature in range(5):
            assert sum(lo <= feature <= hi for lo, hi in spans) <= 2  # ~30 rows per feature, 64 rows per group


def test_context_macro_renders_the_window(store):
    root, data = store
    con = catalog.connect(root)
    rows = data["rows"]
    for r, p, before, after in [(2, 5, 12, 4), (0, 0, 12, 4), (9, 15, 3, 2), (4, 7, 0, 0)]:
        got = con.execute("select context(?, ?, before := ?, after := ?)", [r, p, before, after]).fetchall()[0][0]
        lo, hi = max(0, p - before), min(CONTEXT, p + after + 1)
        expected = "".join(
            f"«{VOCAB[t]}»" if i == p else VOCAB[t] for i, t in enumerate(rows[r].tolist()) if lo <= i < hi
        )
        assert got == expected
    assert con.execute("select context(1, 3)").fetchall()[0][0].count("«") == 1  # default window


FORBIDDEN = [
    "create table t as select 1",
    "insert into feature_stats values (1)",
    "drop view tokens",
    "attach '{outside}/x.db' as x",
    "copy (select 1) to '{outside}/out.csv'",
    "export database '{outside}/db'",
    "install httpfs",
    "load httpfs",
    "set enable_external_access=true",
    "pragma enable_profiling",
    "select * from read_csv('/etc/passwd')",
    "select * from read_text('/etc/passwd')",
    "select * from read_parquet('{outside}/elsewhere.parquet')",
    "select 1; drop view tokens",
]


@pytest.mark.parametrize("sql", FORBIDDEN)
def test_forbidden_sql_is_refused_in_one_line(store, tmp_path, sql):
    root, _ = store
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"x": [1]}), outside / "elsewhere.parquet")
    with pytest.raises(catalog.QueryError) as err:
        catalog.query(root, sql.format(outside=outside))
    message = str(err.value)
    assert "\n" not in message and message
    assert not list(outside.glob("out*")) and not (outside / "x.db").exists() and not (outside / "db").exists()
    assert catalog.query(root, "select count(*) from tokens")[1] == [(10,)]  # the store is untouched


def test_the_connection_itself_is_locked(store, tmp_path):
    root, _ = store
    con = catalog.connect(root)
    for sql in (
        f"copy (select 1) to '{tmp_path}/x.csv'",
        "set lock_configuration=false",
        "select * from read_csv('/etc/passwd')",
    ):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [("select * from no_such_table", "no_such_table"), ("selec 1", "syntax"), ("select 1 +", "syntax"), ("", "empty")],
)
def test_query_errors_are_one_line(store, sql, fragment):
    root, _ = store
    with pytest.raises(catalog.QueryError) as err:
        catalog.query(root, sql)
    assert "\n" not in str(err.value) and fragment in str(err.value).lower()


def test_sql_cli_prints_table_csv_json_and_one_line_errors(store, capsys):
    root, _ = store
    sql = "select layer, count(*) as n from feature_stats group by layer order by layer"
    assert cli(["sql", sql, "--store", str(root), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"layer": 0, "n": 40}, {"layer": 3, "n": 24}]
    assert cli(["sql", sql, "--store", str(root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["layer,n", "0,40", "3,24"]
    assert cli(["sql", sql, "--store", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "n"] and out[-1] == "(2 rows)"
    assert cli(["sql", "select * from nope", "--store", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("circuitflow: error: SQL error")
    assert cli(["sql", "copy (select 1) to 'x.csv'", "--store", str(root)]) == 2
    assert "refused" in capsys.readouterr().err


def test_missing_store_and_store_without_runs(tmp_path):
    with pytest.raises(catalog.QueryError, match="does not exist"):
        catalog.connect(tmp_path / "nope")
    assert catalog.query(tmp_path, "select 42")[1] == [(42,)]
    with pytest.raises(catalog.QueryError, match="no run has finished in the store .* yet"):
        catalog.query(tmp_path, "select * from feature_stats")

"""The mine stage end to end on a tiny model: every Parquet table equals a brute-force dense
computation, spilled runs give the same tables as one run, the catalog reads the published stage,
and under Prefect the stage publishes its artifacts and is a cache hit the second time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

import tasks.mine as mine_task
from core.config import ActivationsConfig, Config, MineConfig, ModelConfig, RunnerConfig, StoreConfig
from core.model import load_model
from core.transcoder import TranscoderConfig, init_transcoder
from storage import catalog, layout, tables
from storage.checkpoints import load_transcoder, save_transcoder

SPEC = 'tiny:{"preset": "rms", "n_layers": 2}'
BOS = 256
LAYERS = (0, 1)
D_SAE = 40


def _plan() -> dict:
    return {"tokens_mine": "tokmine", "tokens_train": "tokmine", "train": {"0": "tr0", "1": "tr1"}, "mine": "minekey"}


def _config(root: Path, **mine) -> Config:
    return Config(
        model=ModelConfig(name=SPEC, device="cpu", dtype="float64"),
        activations=ActivationsConfig(layers=LAYERS),
        mine=MineConfig(batch_rows=4, top_k=6, num_bands=4, per_band=2, view_top=5, dashboard_pages=3, **mine),
        store=StoreConfig(root=str(root)),
        runner=RunnerConfig(torch_threads=1),
    )


def make_inputs(root: Path) -> np.ndarray:
    """Mining tokens and one saved transcoder per layer in the store, as the earlier stages leave them."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(11, 24)).astype(np.int32)
    rows[:, 0] = BOS
    rows[5, 12] = BOS
    tok = layout.stage_dir(root, "tokens", "tokmine")
    tables.write_table(tables.tokens_table(rows), tok / "tokens.parquet")
    tables.write_table(tables.vocab_table([chr(i) for i in range(256)] + ["<bos>"]), tok / "vocab.parquet")
    layout.write_json_atomic(tok / layout.MANIFEST, {"stage": "tokens", "bos_token_id": BOS})
    for layer in LAYERS:
        cfg = TranscoderConfig(32, D_SAE, 32, layer=layer, hook_in=f"blocks.{layer}.ln2.hook_normalized",
                               hook_out=f"blocks.{layer}.hook_mlp_out", model_name=SPEC)  # fmt: skip
        tc = init_transcoder(cfg, seed=layer, dtype=torch.float64)
        with torch.no_grad():
            tc.b_enc.copy_(torch.linspace(-2.0, 0.0, D_SAE, dtype=torch.float64))
        path = layout.stage_dir(root, "train", f"tr{layer}")
        save_transcoder(tc, path)
        layout.write_json_atomic(path / layout.MANIFEST, {"stage": "train"})
    return rows


def dense_reference(root: Path, rows: np.ndarray) -> dict[int, np.ndarray]:
    """layer -> float64 [rows, pos, d_sae] from one full forward pass and a dense encode."""
    model = load_model(SPEC, "cpu", "float64")
    out = {}
    with torch.no_grad():
        names = [f"blocks.{layer}.ln2.hook_normalized" for layer in LAYERS]
        _, cache = model.run_with_cache(torch.as_tensor(rows, dtype=torch.long), names_filter=names)
        for layer in LAYERS:
            tc = load_transcoder(layout.stage_dir(root, "train", f"tr{layer}"))
            z = tc.encode(cache[names[layer]].to(tc.dtype)).numpy().copy()
            z[rows == BOS] = 0.0
            out[layer] = z
    return out


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """The stage run twice: with tiny run/chunk budgets (many parts and chunks) and with defaults."""
    root = tmp_path_factory.mktemp("mine-store")
    rows = make_inputs(root)
    patch = pytest.MonkeyPatch()
    patch.setattr(mine_task, "MAX_RUN_NONZEROS", 700)
    patch.setattr(mine_task, "MAX_CHUNK_NONZEROS", 300)
    spilled = mine_task.mine_features.fn(_config(root), "spilled", _plan())
    patch.undo()
    single = mine_task.mine_features.fn(_config(root), "single", _plan())
    return root, rows, spilled, single, dense_reference(root, rows)


def _acts(stage: Path):
    return ds.dataset(stage / "feature_acts", format="parquet", partitioning="hive").to_table()


def test_feature_acts_equal_the_dense_non_zeros(mined):
    root, rows, spilled, _, dense = mined
    stage = Path(spilled["path"])
    assert len(list((stage / "feature_acts" / "layer=0").glob("part-*.parquet"))) >= 3
    table = _acts(stage)
    for layer in LAYERS:
        t = table.filter(ds.field("layer") == layer)
        feature, row, pos, act = (t.column(n).to_numpy() for n in ("feature", "row", "pos", "act"))
        r, p, f = np.nonzero(dense[layer])
        assert sorted(zip(feature.tolist(), row.tolist(), pos.tolist(), strict=True)) == sorted(
            zip(f.tolist(), r.tolist(), p.tolist(), strict=True)
        )
        np.testing.assert_allclose(act, dense[layer][row, pos, feature], rtol=1e-7, atol=0)  # float32 storage
        assert 0.05 < len(feature) / dense[layer].size < 0.5
    for part in (stage / "feature_acts").rglob("*.parquet"):
        features = pq.read_table(part, columns=["feature"]).column("feature").to_numpy()
        assert np.all(np.diff(features) >= 0)  # every file sorted by feature
    manifest = spilled["manifest"]
    assert manifest["nonzeros"] == table.num_rows and manifest["n_tokens"] == int((rows != BOS).sum())
    assert manifest["bytes_per_nonzero"] < 14  # smaller than the raw columns


def test_stats_and_top_k_equal_the_dense_computation(mined):
    root, rows, spilled, _, dense = mined
    stage = Path(spilled["path"])
    stats = pq.read_table(stage / "feature_stats.parquet").to_pylist()
    top = pq.read_table(stage / "top_examples.parquet").to_pylist()
    n_tokens = int((rows != BOS).sum())
    assert len(stats) == D_SAE * len(LAYERS)
    for s in stats:
        col = dense[s["layer"]][:, :, s["feature"]].astype(np.float32)
        r, p = np.nonzero(col)
        assert s["n_fired"] == len(r) and s["freq"] == pytest.approx(len(r) / n_tokens, rel=1e-12)
        if len(r) == 0:
            assert s["max_act"] is None and s["mean_act"] is None and sum(s["histogram"]) == 0
            continue
        assert s["max_act"] == col.max() and s["min_act"] == col[r, p].min()
        assert s["mean_act"] == pytest.approx(col[r, p].astype(np.float64).mean(), rel=1e-6)
        assert sum(s["histogram"]) == len(r) and len(s["histogram"]) == 20
        expected = sorted(zip((-col[r, p]).tolist(), r.tolist(), p.tolist(), strict=True))[:6]
        got = [
            (e["row"], e["pos"]) for e in top if (e["layer"], e["feature"], e["band"]) == (s["layer"], s["feature"], -1)
        ]
        assert got == [(rr, pp) for _, rr, pp in expected]
    assert {e["band"] for e in top} == {-1, 0, 1, 2, 3}


def test_spilled_runs_give_the_same_tables_as_one_run(mined):
    _, _, spilled, single, _ = mined
    for name in ("feature_stats", "top_examples", "feature_views"):
        a = pq.read_table(Path(spilled["path"]) / f"{name}.parquet")
        b = pq.read_table(Path(single["path"]) / f"{name}.parquet")
        assert a.to_pylist() == b.to_pylist(), name
    assert len(list((Path(single["path"]) / "feature_acts" / "layer=0").glob("*.parquet"))) == 1


def test_views_and_dashboards_are_written(mined):
    _, _, spilled, _, _ = mined
    stage = Path(spilled["path"])
    view_rows = pq.read_table(stage / "feature_views.parquet")
    views = view_rows.column("view").to_pylist()
    counts = {v: views.count(v) for v in set(views)}
    per_layer = 5 * D_SAE  # view_top rows per feature
    heads = 4  # tiny models have 4 heads: layer 0 sees 4 (fewer than view_top), layer 1 sees 8
    assert counts == {
        "deembed": 2 * per_layer, "logit_top": 2 * per_layer, "logit_bottom": 2 * per_layer,
        "head_deembed": 2 * per_layer, "ov_norm": (heads + 5) * D_SAE, "pullback": per_layer,  # pullback: layer 1 only
    }  # fmt: skip
    pages = sorted(p.name for p in (stage / "dashboards").glob("layer*.html"))
    assert len(pages) == 6 and (stage / "dashboards" / "index.html").is_file()
    index = (stage / "dashboards" / "index.html").read_text()
    assert all(f'href="{p}"' in index for p in pages)
    assert spilled["manifest"]["dashboards"]["pages"] == 6


def test_the_catalog_reads_the_published_stage(mined, capsys):
    root, _, spilled, _, _ = mined
    record = {"created": "now", "seconds": 1.0, "plan": {**_plan(), "mine": "spilled"}, "stages": []}
    (root / "runs").mkdir(exist_ok=True)
    layout.write_json_atomic(root / "runs" / "latest.json", record)
    names, rows = catalog.query(root, "select count(*), count(distinct layer) from feature_acts")
    assert rows == [(spilled["manifest"]["nonzeros"], 2)]
    _, ctx = catalog.query(root, "select context(row, pos) from top_examples where band = -1 and rank = 0 limit 1")
    assert "«" in ctx[0][0]
    from flows.cli import main as cli

    assert cli(["feature", "1", "3", "--store", str(root)]) == 0
    assert capsys.readouterr().out.startswith("layer 1 feature 3")


def test_external_transcoders_are_mined_without_training(mined, tmp_path):
    root, _, _, single, _ = mined
    cfg = Config(**{**_config(root).__dict__, "transcoders": str(root / "train" / "tr*")})
    got = mine_task.mine_features.fn(cfg, "external", _plan())
    a = pq.read_table(Path(got["path"]) / "top_examples.parquet").to_pylist()
    assert a == pq.read_table(Path(single["path"]) / "top_examples.parquet").to_pylist()


def test_missing_transcoder_is_one_line(tmp_path):
    make_inputs(tmp_path)
    plan = {**_plan(), "train": {"0": "tr0", "1": "absent"}}
    with pytest.raises(layout.StoreError, match="layer 1 is not trained") as err:
        mine_task.mine_features.fn(_config(tmp_path), "k", plan)
    assert "\n" not in str(err.value)


@pytest.mark.prefect
def test_prefect_run_publishes_artifacts_and_caches(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact

    make_inputs(tmp_path)
    cfg = _config(tmp_path)

    @flow
    def run_twice() -> list[str]:
        names = []
        for _ in range(2):
            state = mine_task.mine_features.with_options(result_storage=tmp_path / ".results")(
                cfg=cfg, key="flowkey", plan=_plan(), return_state=True
            )
            state.result()
            names.append(state.name)
        return names

    assert run_twice() == ["Completed", "Cached"]
    link = Artifact.get("mine-dashboards")  # no CIRCUITFLOW_SERVE_URL here: the command that serves the pages
    assert link is not None and f"circuitflow serve --store {tmp_path.resolve()}" in link.data
    assert "/mine/flowkey/" in link.data and "file://" not in link.data
    table = Artifact.get("mine-top-features")
    assert table is not None and "most frequent" in str(table.data)


def test_missing_tokens_and_misfit_transcoders_are_one_line(tmp_path):
    with pytest.raises(layout.StoreError, match="run the tokens stage first"):
        mine_task.mine_features.fn(_config(tmp_path), "k", _plan())
    make_inputs(tmp_path)
    wide = init_transcoder(TranscoderConfig(48, 8, 48, layer=1), seed=0)  # the tiny model is 32 wide
    save_transcoder(wide, layout.stage_dir(tmp_path, "train", "wide"))
    layout.write_json_atomic(layout.stage_dir(tmp_path, "train", "wide") / layout.MANIFEST, {})
    from storage.checkpoints import CheckpointError

    with pytest.raises(CheckpointError) as err:
        mine_task.mine_features.fn(_config(tmp_path), "k", {**_plan(), "train": {"0": "tr0", "1": "wide"}})
    assert "\n" not in str(err.value) and "48" in str(err.value)

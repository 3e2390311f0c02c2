"""SAEs through the same stages as transcoders, on a tiny model: the train stage writes an SAE folder
reading and reconstructing one hook, its held-out FVU and spliced CE match independent references,
and the mine stage mines it at that hook."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import tasks.mine as mine_task
from core.config import MineConfig
from core.model import load_model
from storage import layout, tables
from storage.checkpoints import load_transcoder
from storage.shards import ActivationCache
from tasks.evaluate import split_rows
from tests.core.test_sae_splice import reference_ce
from tests.tasks.test_train_stage import prepare, run, write_config

LAYER = 1
HOOK = {"sae_mlp_out": "blocks.1.hook_mlp_out", "sae_mlp_in": "blocks.1.ln2.hook_normalized"}
SIDE = {"sae_mlp_out": 1, "sae_mlp_in": 0}
"""Which side of a cached (mlp_in, mlp_out) pair the SAE reconstructs."""


@pytest.fixture(scope="module", params=list(HOOK))
def trained(request, tmp_path_factory):
    kind = request.param
    cfg, plan = prepare(write_config(tmp_path_factory.mktemp(kind), kind=kind, l1_coefficient=1e-4))
    return kind, cfg, plan, run(cfg, plan, LAYER)


def test_sae_folder_reads_and_writes_one_hook(trained) -> None:
    kind, cfg, plan, summary = trained
    tc = load_transcoder(summary["path"])
    assert summary["status"] == "ran" and summary["manifest"]["kind"] == kind
    assert tc.cfg.hook_in == tc.cfg.hook_out == HOOK[kind]
    assert (tc.cfg.d_in, tc.cfg.d_sae, tc.cfg.d_out, tc.cfg.layer) == (32, 64, 32, LAYER)


def test_sae_fvu_is_against_its_own_side(trained) -> None:
    """eval.json's FVU equals a float64 numpy FVU of the saved SAE on the held-out side it reconstructs."""
    kind, cfg, plan, summary = trained
    tc = load_transcoder(summary["path"])
    source = ActivationCache(layout.stage_dir(cfg.store.root, "activations", plan.activations)).layer(LAYER)
    split = split_rows(source.n_tokens, source.tokens_per_row, cfg.train.eval_fraction)
    x = source.read(split.train_stop, source.n_tokens)[SIDE[kind]]  # [n, 32]
    with torch.no_grad():
        out = tc(x).out.double().numpy()
    y = x.double().numpy()
    expected = ((out - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    ev = json.loads((Path(summary["path"]) / "eval.json").read_text())
    assert ev["fvu"] == pytest.approx(expected, rel=1e-5)
    assert ev["eval_tokens"] == x.shape[0]


def test_sae_spliced_ce_matches_an_independent_splice(trained) -> None:
    """The stage's CE spliced: the MLP output replaced by the SAE's reconstruction of it (mlp_out), or
    the MLP run on the SAE's reconstruction of its input (mlp_in), on the held-out rows, BOS kept clean."""
    kind, cfg, plan, summary = trained
    tc = load_transcoder(summary["path"])
    model = load_model(cfg.model.name, "cpu")
    mlp = model.blocks[LAYER].mlp
    rows = tables.read_tokens(layout.stage_dir(cfg.store.root, "tokens", plan.tokens_train) / "tokens.parquet")
    held_out = torch.from_numpy(rows[-4:].astype(np.int64))  # eval_fraction 0.1 of 40 rows; eval_ce_rows 4
    with torch.no_grad():
        replace = {"sae_mlp_out": lambda u, act: tc(act).out, "sae_mlp_in": lambda u, act: mlp(tc(u).out)}[kind]
        spliced = reference_ce(model, held_out, 1, replace)
        clean = reference_ce(model, held_out, 1, lambda u, act: act)
    ev = json.loads((Path(summary["path"]) / "eval.json").read_text())
    assert ev["ce_clean"] == pytest.approx(clean, abs=1e-6)
    assert ev["ce_spliced"] == pytest.approx(spliced, abs=1e-6)
    assert abs(ev["ce_spliced"] - ev["ce_clean"]) > 1e-5  # the SAE is not exact, so the check has teeth


def test_sae_is_mined_at_its_hook(trained) -> None:
    """feature_acts of the mine stage equal a dense encode of the activations at the SAE's hook (BOS skipped)."""
    kind, cfg, plan, summary = trained
    cfg = dataclasses.replace(
        cfg,
        activations=dataclasses.replace(cfg.activations, layers=(LAYER,)),
        mine=MineConfig(batch_rows=4, top_k=3, num_bands=2, per_band=1, view_top=3, dashboard_pages=1),
    )
    mine_plan = {"tokens_mine": plan.tokens_train, "tokens_train": plan.tokens_train,
                 "train": {str(LAYER): plan.train[LAYER]}}  # fmt: skip
    mined = mine_task.mine_features.fn(cfg, f"sae-{kind}", mine_plan)
    acts = ds.dataset(Path(mined["path"]) / "feature_acts", format="parquet", partitioning="hive").to_table()

    tokens_dir = layout.stage_dir(cfg.store.root, "tokens", plan.tokens_train)
    rows = tables.read_tokens(tokens_dir / "tokens.parquet")
    bos = layout.read_manifest(tokens_dir)["bos_token_id"]
    tc = load_transcoder(summary["path"])
    model = load_model(cfg.model.name, "cpu")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(rows, dtype=torch.long), names_filter=[HOOK[kind]])
        z = tc.encode(cache[HOOK[kind]]).numpy()  # [row, pos, d_sae]
    z[rows == bos] = 0.0
    row, pos, feature = np.nonzero(z)
    got = sorted(zip(acts["feature"].to_pylist(), acts["row"].to_pylist(), acts["pos"].to_pylist(), strict=True))
    assert got == sorted(zip(feature.tolist(), row.tolist(), pos.tolist(), strict=True))
    assert len(got) > 0
    order = np.lexsort((pos, row, feature))
    mined_acts = acts.sort_by([("feature", "ascending"), ("row", "ascending"), ("pos", "ascending")])["act"]
    np.testing.assert_allclose(mined_acts.to_numpy(), z[row, pos, feature][order], rtol=1e-5, atol=1e-6)

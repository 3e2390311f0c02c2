"""The train stage on a tiny model: the written folder, metrics and report; a killed training
resumes to the same weights; a diverging run stops and keeps its last good checkpoint; the
Prefect flow runs one task per layer, then hits the cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import tasks.evaluate as evaluate_stage
import tasks.train as train_stage
from core.config import load_config
from core.train import TrainingDivergedError
from storage import layout
from storage.checkpoints import load_transcoder
from tasks.activations import cache_activations
from tasks.plan import make_plan, replacement_key
from tasks.tokens import tokenize_corpus
from tests.corpora import write_corpus


def write_config(tmp_path, store: str = "store", **train) -> str:
    corpus = tmp_path / "corpus"
    if not corpus.exists():  # written once: its fingerprint is part of every key
        write_corpus(corpus, 30)
    cfg = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 33, "train_rows": 40, "mine_rows": 4, "holdout_fraction": 0.1},
        "activations": {"layers": [0, 1], "batch_rows": 8},
        "train": {"expansion_factor": 2, "batch_size": 128, "epochs": 2, "checkpoint_every": 5, "lr": 3e-3,
                  "eval_fraction": 0.1, "eval_ce_rows": 4, "init_tokens": 256, **train},
        "store": {"root": str(tmp_path / store)},
    }  # fmt: skip
    path = tmp_path / f"{store}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def prepare(config: str):
    """Tokens and activations stages (without Prefect); returns (cfg, plan)."""
    cfg = load_config(config)
    plan = make_plan(cfg)
    tokenize_corpus.fn(cfg, "train", plan.tokens_train)
    cache_activations.fn(cfg, plan.activations, plan.tokens_train)
    return cfg, plan


def run(cfg, plan, layer: int = 1) -> dict:
    return train_stage.train_transcoder.fn(cfg, plan.train[layer], layer, plan.activations, plan.tokens_train)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg, plan = prepare(write_config(tmp))
    return cfg, plan, run(cfg, plan)


def test_stage_writes_the_transcoder_metrics_and_report(trained) -> None:
    cfg, plan, summary = trained
    folder = layout.stage_dir(cfg.store.root, "train", plan.train[1])
    assert summary["status"] == "ran" and summary["layer"] == 1 and summary["path"] == str(folder)
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "metrics.parquet", "eval.json",
                 "eval.md", "training_curve.png", "manifest.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert not (folder.parent / f"{plan.train[1]}.partial").exists()  # scratch removed after publishing

    tc = load_transcoder(folder)
    assert (tc.cfg.d_in, tc.cfg.d_sae, tc.cfg.layer) == (32, 64, 1)
    assert tc.cfg.hook_in == "blocks.1.ln2.hook_normalized" and tc.cfg.hook_out == "blocks.1.hook_mlp_out"

    metrics = pq.read_table(folder / "metrics.parquet").to_pydict()
    assert set(metrics) >= {"step", "tokens", "loss", "mse", "sparsity", "l0", "fvu", "dead", "lr"}
    n_train = (40 - 4) * 32  # 36 of 40 rows train, BOS dropped: 32 pairs per row
    steps = 2 * -(-n_train // 128)
    assert metrics["step"] == list(range(1, steps + 1))
    assert metrics["tokens"][-1] == 2 * n_train

    ev = json.loads((folder / "eval.json").read_text())
    assert ev["eval_tokens"] == 4 * 32
    assert ev["ce_rows"] == 4 and ev["ce_n_tokens"] == 4 * 31  # BOS predictions excluded
    assert ev["ce_zero"] != ev["ce_clean"]
    for name in ("fvu", "l0", "ce_recovered", "ce_kl", "dead_fraction"):
        assert np.isfinite(ev[name]), name
    assert sum(ev["log10_density_histogram"]["counts"]) == 64
    assert "CE recovered" in (folder / "eval.md").read_text()


def test_stage_eval_matches_the_saved_transcoder(trained) -> None:
    """The reported held-out FVU is what the saved (SAELens-layout) weights give on the held-out pairs."""
    from core.metrics import evaluate_pairs
    from storage.shards import ActivationCache

    cfg, plan, summary = trained
    folder = layout.stage_dir(cfg.store.root, "train", plan.train[1])
    source = ActivationCache(layout.stage_dir(cfg.store.root, "activations", plan.activations)).layer(1)
    split = evaluate_stage.split_rows(source.n_tokens, source.tokens_per_row, cfg.train.eval_fraction)
    again = evaluate_pairs(load_transcoder(folder), source, split.train_stop, source.n_tokens)
    ev = json.loads((folder / "eval.json").read_text())
    assert again.fvu == pytest.approx(ev["fvu"], rel=1e-5)
    assert again.l0 == pytest.approx(ev["l0"], rel=1e-6)


def test_rerun_is_cached(trained) -> None:
    cfg, plan, summary = trained
    again = run(cfg, plan)
    assert again["status"] == "cached" and again["key"] == summary["key"]


def test_all_layers_replaced_at_once(trained) -> None:
    cfg, plan, _ = trained
    run(cfg, plan, layer=0)
    key = replacement_key(cfg, plan.train)
    summary = evaluate_stage.evaluate_replacement.fn(cfg, key, dict(plan.train), plan.tokens_train)
    ev = json.loads((layout.stage_dir(cfg.store.root, "evaluate", key) / "eval.json").read_text())
    assert summary["status"] == "ran" and ev["layers"] == [0, 1]
    per_layer = [
        json.loads((layout.stage_dir(cfg.store.root, "train", plan.train[layer]) / "eval.json").read_text())
        for layer in (0, 1)
    ]
    assert all(ev["ce_clean"] == pytest.approx(p["ce_clean"], rel=1e-9) for p in per_layer)  # same held-out rows
    assert all(ev["ce_zero"] != pytest.approx(p["ce_zero"], rel=1e-4) for p in per_layer)  # both zeroed, not one
    assert all(ev["ce_spliced"] != pytest.approx(p["ce_spliced"], rel=1e-4) for p in per_layer)
    assert ev["ce_n_tokens"] == per_layer[0]["ce_n_tokens"]


class Killed(Exception):
    pass


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    reference_cfg, reference_plan = prepare(write_config(tmp_path, "reference"))
    reference = load_transcoder(run(reference_cfg, reference_plan)["path"])

    cfg, plan = prepare(write_config(tmp_path, "killed"))
    assert plan.train[1] == reference_plan.train[1]
    real_fit = train_stage.fit

    def fit_then_die(tc, source, train_cfg, callbacks, **kw):
        def die(state, row):
            if state.step == 7:  # two steps after the checkpoint at step 5
                raise Killed

        return real_fit(tc, source, train_cfg, [*callbacks, die], **kw)

    monkeypatch.setattr(train_stage, "fit", fit_then_die)
    with pytest.raises(Killed):
        run(cfg, plan)
    scratch = layout.stage_dir(cfg.store.root, "train", plan.train[1]).with_name(f"{plan.train[1]}.partial")
    assert (scratch / train_stage.CHECKPOINT).is_file()
    assert not layout.is_complete(layout.stage_dir(cfg.store.root, "train", plan.train[1]))

    monkeypatch.setattr(train_stage, "fit", real_fit)
    resumed = load_transcoder(run(cfg, plan)["path"])
    for name, p in reference.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    cfg, plan = prepare(write_config(tmp_path))
    from core import train as core_train

    real_step = core_train.train_step

    def poisoned(tc, optimizer, x, y, *args, **kw):
        if optimizer.state and next(iter(optimizer.state.values()))["step"] >= 8:
            x = x * float("nan")
        return real_step(tc, optimizer, x, y, *args, **kw)

    monkeypatch.setattr(core_train, "train_step", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"layer 1: training diverged \(loss nan\) by step 9"):
        run(cfg, plan)
    scratch = layout.stage_dir(cfg.store.root, "train", plan.train[1]).with_name(f"{plan.train[1]}.partial")
    from safetensors import safe_open

    with safe_open(str(scratch / train_stage.CHECKPOINT), framework="pt") as fh:
        assert json.loads(fh.metadata()["meta"])["step"] == 5
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())  # noqa: SIM118


def test_split_rows_holds_out_whole_rows() -> None:
    split = evaluate_stage.split_rows(n_tokens=100 * 127, tokens_per_row=127, eval_fraction=0.05)
    assert split == evaluate_stage.Split(n_rows=100, eval_rows=5, train_stop=95 * 127)
    assert evaluate_stage.split_rows(10 * 7, 7, 0.0).eval_rows == 1  # always at least one held-out row
    with pytest.raises(layout.StoreError, match="eval_fraction"):
        evaluate_stage.split_rows(3 * 7, 7, 0.9)


@pytest.mark.prefect
def test_pipeline_trains_every_layer_then_hits_the_cache(prefect_harness, tmp_path) -> None:
    from flows.pipeline import pipeline

    config = write_config(tmp_path, epochs=1)
    first = [s for s in pipeline(config=config, stages=["tokens", "activations", "train"]) if s["stage"] == "train"]
    assert sorted(s["layer"] for s in first) == [0, 1]
    assert all(s["status"] == "ran" for s in first)
    again = [s for s in pipeline(config=config, stages=["tokens", "activations", "train"]) if s["stage"] == "train"]
    assert all(s["status"] == "cached" for s in again)
    assert [s["key"] for s in again] == [s["key"] for s in first]
    joint = [s for s in pipeline(config=config, stages=["train"]) if s["stage"] == "evaluate"]
    assert len(joint) == 1 and joint[0]["status"] == "cached" and joint[0]["manifest"]["eval"]["layers"] == [0, 1]

"""The feature_inputs stage on a tiny pipeline (tokens, random transcoders, mine), read back through
`circuitflow sql`: the view holds, for each analysed feature, the mean inputs that
core.dataset_attribution computes over the contexts the mine stage recorded (float32, 1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from core.config import load_config
from core.dataset_attribution import dataset_inputs
from core.model import load_model
from flows.pipeline import record_run
from storage import catalog, layout
from tasks.feature_inputs import mean_feature_inputs
from tasks.mine import mine_features
from tasks.plan import make_plan
from tasks.tokens import tokenize_corpus
from tasks.trace import load_transcoders
from tests import corpora
from tests.tasks.test_trace_stage import write_random_transcoders


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    base = tmp_path_factory.mktemp("feature-inputs")
    corpus = corpora.write_corpus(base / "corpus", 40)
    data = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 16, "train_rows": 8, "mine_rows": 6, "holdout_fraction": 0.3},
        "activations": {"layers": [0, 1]},
        "mine": {"top_k": 3, "num_bands": 2, "per_band": 1, "dashboard_pages": 0},
        "trace": {"roots": [{"prompt": "The cat sat on the mat.", "layer": 1}]},
        "feature_inputs": {"features": ["1:3"], "top": 2, "layers": [1], "roots": True, "max_contexts": 12},
        "store": {"root": str(base / "store")},
        "runner": {"torch_threads": 1},
    }
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    plan = make_plan(cfg)
    write_random_transcoders(cfg.store.root, plan)
    summaries = [tokenize_corpus.fn(cfg, "heldout", plan.tokens_mine), mine_features.fn(cfg, plan.mine, plan.keys())]
    summaries.append(mean_feature_inputs.fn(cfg, plan.feature_inputs, plan.keys()))
    record_run(cfg, plan, ["tokens", "mine", "feature_inputs"], summaries, 0.0, orchestrator="none")
    return cfg, plan, summaries[-1], config


def sql(store, query):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", query, "--store", str(store), "--format", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_the_view_returns_the_mean_inputs_of_every_analysed_feature(analysed):
    cfg, plan, summary, _ = analysed
    features = [(f["layer"], f["feature"]) for f in summary["manifest"]["features"]]
    assert (1, 3) in features and len(features) >= 3  # listed, top 2 of layer 1, the trace root
    con = catalog.connect(cfg.store.root)
    try:
        contexts = {
            f: [tuple(r) for r in con.execute(
                "select row, pos from feature_acts where layer=? and feature=? order by act desc, row, pos limit 12", list(f)
            ).fetchall()]
            for f in features
        }  # fmt: skip
    finally:
        con.close()
    all_rows = torch.tensor([r[0] for r in catalog.query(cfg.store.root, "select tokens from tokens order by row")[1]])
    stats = dataset_inputs(load_model("tiny:ln", "cpu"), load_transcoders(cfg, plan.keys()), all_rows, contexts)
    layer, feature = features[0]
    got = sql(cfg.store.root, f"select * from feature_inputs where layer={layer} and feature={feature} order by all")
    want = stats[(layer, feature)]
    assert {r["contexts"] for r in got} == {want.contexts} and want.contexts == len(contexts[(layer, feature)]) > 0
    expected = {(r.source_kind, r.source_layer, r.source_index): r for r in want.rows()}
    assert len(got) == len(expected)
    for r in got:
        e = expected[(r["source_kind"], r["source_layer"], r["source_index"])]
        assert abs(r["mean"] - e.mean) <= 1e-5 * max(1.0, abs(e.mean)) and r["count"] == e.count
    top = sql(cfg.store.root, "select source_kind, source_index from feature_inputs where layer=1 and feature=3 "
              "and source_kind='feature' order by mean desc limit 3")  # fmt: skip
    assert top and all(r["source_kind"] == "feature" for r in top)
    assert layout.is_complete(layout.stage_dir(cfg.store.root, "feature_inputs", plan.feature_inputs))


@pytest.mark.prefect
def test_the_pipeline_flow_runs_the_stage_under_prefect(analysed, prefect_harness):
    """The pipeline flow with `stages=["feature_inputs"]` runs it as a Prefect task (forced: rebuilt,
    the same features), then a second run is a cache hit."""
    from flows.pipeline import pipeline

    _, plan, first, config = analysed
    (ran,) = pipeline(config=str(config), stages=["feature_inputs"], force=["feature_inputs"])
    assert (ran["stage"], ran["status"], ran["key"]) == ("feature_inputs", "ran", plan.feature_inputs)
    assert ran["manifest"]["features"] == first["manifest"]["features"]
    (again,) = pipeline(config=str(config), stages=["feature_inputs"])
    assert again["status"] == "cached"


def test_roots_true_with_only_logit_roots_asks_for_no_stage(tmp_path):
    from tasks.plan import wants_feature_inputs

    def config(roots: list[dict]) -> object:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"trace": {"roots": roots}, "feature_inputs": {"roots": True}}))
        return load_config(path)

    assert not wants_feature_inputs(config([{"prompt": "a b", "logit": " b"}, {"prompt": "a b"}]))
    assert wants_feature_inputs(config([{"prompt": "a b", "logit": " b"}, {"prompt": "a b", "layer": 0}]))

"""The trace stage and `circuitflow trace` on a tiny model with transcoders written into a store
the way the train stage leaves them (a SAELens-layout folder plus a manifest)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core.config import load_config
from core.transcoder import TranscoderConfig, init_transcoder
from flows.cli import main as cli
from storage import layout
from storage.checkpoints import save_transcoder
from tasks.plan import make_plan
from tasks.trace import trace_roots

PROMPT = "The cat sat on the mat."
CONFIG = {
    "model": {"name": "tiny:ln", "device": "cpu"},
    "activations": {"layers": [0, 1]},
    "trace": {"roots": [{"prompt": PROMPT, "layer": 1, "feature": 3, "pos": -1}], "num_branches": 5},
    "runner": {"torch_threads": 1},
}


def write_random_transcoders(root, plan, d_model: int = 32, d_sae: int = 128) -> None:
    """Random transcoders (with biases) for each layer of the plan, published as the train stage."""
    for layer, key in plan.train.items():
        tc_cfg = TranscoderConfig(
            d_model, d_sae, d_model, hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hook_out=f"blocks.{layer}.hook_mlp_out", layer=layer, model_name="tiny:ln",
        )  # fmt: skip
        tc = init_transcoder(tc_cfg, seed=layer)
        gen = torch.Generator().manual_seed(layer)
        with torch.no_grad():
            tc.b_enc.copy_(0.2 * torch.randn(d_sae, generator=gen))
            tc.b_dec_out.copy_(0.1 * torch.randn(d_model, generator=gen))
        with layout.staging(root, "train", key) as tmp:
            save_transcoder(tc, tmp)
            layout.write_json_atomic(tmp / layout.MANIFEST, {"stage": "train", "layer": layer})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store whose train stage holds random transcoders (with biases) for layers 0 and 1."""
    root = tmp_path_factory.mktemp("store")
    config = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "store": {"root": str(root)}}))
    cfg = load_config(config)
    plan = make_plan(cfg)
    write_random_transcoders(root, plan)
    return cfg, plan, config


def test_stage_writes_tables_json_and_picture(store):
    cfg, plan, _ = store
    summary = trace_roots.fn(cfg, plan.trace, plan.keys())
    assert summary["status"] == "ran"
    out = layout.stage_dir(cfg.store.root, "trace", plan.trace)
    nodes = pq.read_table(out / "nodes.parquet").to_pylist()
    edges = pq.read_table(out / "edges.parquet").to_pylist()
    assert {n["graph"] for n in nodes} == {"paths", "full"}
    for graph in ("paths", "full"):
        root = next(n for n in nodes if n["graph"] == graph and n["kind"] == "root")
        assert root["pos"] == len(PROMPT.encode()) and root["token"] == "."  # byte tokens, BOS first
    # path graph: every expanded node's incoming edges sum to its attribution (error terms included)
    paths_nodes = {n["id"]: n for n in nodes if n["graph"] == "paths"}
    incoming: dict[str, float] = {}
    for e in edges:
        if e["graph"] == "paths":
            incoming[e["target"]] = incoming.get(e["target"], 0.0) + e["weight"]
    for target, total in incoming.items():
        assert abs(total - paths_nodes[target]["attribution"]) < 1e-4 * max(1.0, abs(total))
    kinds = {n["kind"] for n in paths_nodes.values()}
    assert {"root", "feature", "error", "bias", "prune_error"} <= kinds
    data = json.loads((out / "graph.json").read_text())
    assert [g["graph"] for g in data["graphs"]] == ["paths", "full"] and data["graphs"][0]["paths"]
    page = (out / "graph.html").read_text()
    assert page.count("<svg") == 2 and "prune_error" in page
    manifest = summary["manifest"]
    terms = manifest["roots"][0]["root_terms"]
    assert manifest["roots"][0]["layer"] == 1 and set(terms) == {"traced children", "error", "bias", "prune_error"}
    assert abs(sum(terms.values()) - manifest["roots"][0]["pre_activation"]) < 1e-4
    again = trace_roots.fn(cfg, plan.trace, plan.keys())
    assert again["status"] == "cached"


def test_cli_prints_paths_and_writes_out(store, tmp_path, capsys):
    cfg, _, config = store
    out = tmp_path / "out"
    code = cli(
        ["trace", "--prompt", PROMPT, "--layer", "1", "--feature", "3", "--config", str(config), "--out", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "top paths" in text and "prune_error" in text and "pre-activation" in text
    assert {p.name for p in out.iterdir()} >= {"nodes.parquet", "edges.parquet", "graph.json", "graph.html"}
    code = cli(["trace", "--prompt", PROMPT, "--layer", "1", "--feature", "3", "--config", str(config), "--full"])
    assert code == 0 and "full graph:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "1", "--feature", "999"], "--feature 999: out of range; layer 1's transcoder has features 0..127"),
        (["--layer", "5", "--feature", "0"], "--layer 5: no transcoder for this layer; layers with one: 0, 1"),
        (["--layer", "1", "--feature", "0", "--pos", "40"], "--pos 40: out of range; the prompt has 24 tokens"),
        (["--layer", "1", "--feature", "0", "--prompt", "x" * 300], "--prompt is 301 tokens long"),
    ],
)
def test_cli_bad_input_is_one_line(store, capsys, args, message):
    _, _, config = store
    argv = ["trace", "--config", str(config)] + args
    if "--prompt" not in args:
        argv += ["--prompt", PROMPT]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _strongest_at_last_token(cfg, plan, layer: int) -> tuple[int, float]:
    """Independent reference for the automatic root: the transcoder applied to the MLP input that a
    plain forward pass caches at the prompt's last token; (argmax feature, its activation)."""
    from core.model import load_model
    from tasks.trace import encode_prompt, load_transcoders

    tc = load_transcoders(cfg, plan.keys())[layer]
    model = load_model("tiny:ln", device="cpu")
    tokens = encode_prompt(cfg, PROMPT).tokens
    _, cache = model.run_with_cache(tokens[None], names_filter=[tc.cfg.hook_in])
    z = tc.encode(cache[tc.cfg.hook_in][0, -1]).detach()
    assert int((z > 0).sum()) >= 2  # a real choice among several active features
    return int(z.argmax()), float(z.max())


def test_stage_chooses_the_strongest_feature_when_none_is_given(store):
    """A root without `feature` traces the feature with the largest activation at its token; the manifest,
    the nodes table and the markdown record which one."""
    import dataclasses

    from core.config import RootConfig
    from tasks.trace import trace_markdown

    cfg, _, _ = store
    roots = (RootConfig(PROMPT, layer=1),)
    cfg = dataclasses.replace(cfg, trace=dataclasses.replace(cfg.trace, roots=roots, full=False))
    plan = make_plan(cfg)
    expected, activation = _strongest_at_last_token(cfg, plan, 1)
    summary = trace_roots.fn(cfg, plan.trace, plan.keys())
    root = summary["manifest"]["roots"][0]
    assert (root["feature"], root["feature_auto"]) == (expected, True)
    assert abs(root["activation"] - activation) < 1e-4 * max(1.0, activation)  # float32 model, float32 trace
    nodes = pq.read_table(layout.stage_dir(cfg.store.root, "trace", plan.trace) / "nodes.parquet").to_pylist()
    root_node = next(n for n in nodes if n["kind"] == "root")
    assert (root_node["feature"], root_node["label"]) == (expected, f"F1.{expected}@23")
    assert f"feature {expected} (chosen: the largest activation there)" in trace_markdown(summary)


def test_cli_without_feature_prints_the_chosen_one(store, capsys):
    cfg, plan, config = store
    expected, _ = _strongest_at_last_token(cfg, plan, 1)
    assert cli(["trace", "--prompt", PROMPT, "--layer", "1", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"root feature chosen: {expected} (no --feature" in text
    assert f"root: layer 1 feature {expected} at token 23" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "5"], "--layer 5: no transcoder for this layer; layers with one: 0, 1"),
        (["--layer", "1", "--pos", "-25"], "--pos -25: out of range; the prompt has 24 tokens"),
        (["--layer", "1", "--prompt", "x" * 300], "--prompt is 301 tokens long"),
    ],
)
def test_cli_bad_input_without_feature_is_one_line(store, capsys, args, message):
    _, _, config = store
    argv = ["trace", "--config", str(config)] + args
    if "--prompt" not in args:
        argv += ["--prompt", PROMPT]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.prefect
def test_stage_runs_as_a_prefect_task(store, prefect_harness, tmp_path):
    cfg, plan, _ = store
    import dataclasses

    cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, root=str(tmp_path)))
    for key in plan.train.values():  # the same transcoders, in a fresh store
        src = layout.stage_dir(store[0].store.root, "train", key)
        dst = layout.stage_dir(tmp_path, "train", key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copytree(src, dst)
    state = trace_roots(cfg=cfg, key=plan.trace, plan=plan.keys(), return_state=True)
    assert state.is_completed()
    assert state.result()["manifest"]["graphs"] == 2


def test_cli_falls_back_to_the_latest_runs_transcoders(store, tmp_path, capsys):
    """Transcoders trained before a code change (other keys) are used when the latest run recorded
    them with the same model, layers and train settings; otherwise the error says what is missing."""
    import shutil

    cfg, plan, config = store
    old = {}
    for layer, key in plan.train.items():
        old[str(layer)] = f"old{layer:013d}"
        shutil.copytree(
            layout.stage_dir(cfg.store.root, "train", key), layout.stage_dir(tmp_path, "train", old[str(layer)])
        )
    (tmp_path / "runs").mkdir()
    record = {"config": cfg.to_dict(), "plan": {**plan.keys(), "train": old}}
    (tmp_path / "runs" / "latest.json").write_text(json.dumps(record))
    argv = [
        "trace",
        "--prompt",
        PROMPT,
        "--layer",
        "1",
        "--feature",
        "3",
        "--config",
        str(config),
        "--store",
        str(tmp_path),
    ]
    assert cli(argv) == 0
    assert "latest run" in capsys.readouterr().out
    assert cli(argv + ["--set", "train.l1_coefficient=0.5"]) == 2
    assert "is not trained" in capsys.readouterr().err

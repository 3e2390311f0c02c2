"""Logit roots (given, a difference, or the top prediction) and path filters, from the user's seat:
`circuitflow trace` and the trace stage on the tiny store of test_trace_stage. The references are
the model's own logits from a plain forward pass (float32: 1e-4 relative)."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch

from core.config import ConfigError, RootConfig
from flows.cli import main as cli
from storage import layout
from tasks.plan import make_plan
from tasks.trace import encode_prompt, trace_roots
from tests.tasks.test_trace_stage import PROMPT, store  # noqa: F401 - the module's store fixture


def model_logits(cfg) -> torch.Tensor:
    from core.model import load_model

    model = load_model("tiny:ln", device="cpu")
    with torch.no_grad():
        return model(encode_prompt(cfg, PROMPT).tokens[None])[0, -1]


def root_row(out):
    return next(n for n in pq.read_table(out / "nodes.parquet").to_pylist() if n["kind"] == "root")


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def test_cli_logit_and_logit_difference_roots_equal_the_models_logits(store, tmp_path, capsys):  # noqa: F811
    cfg, _, config = store
    logits = model_logits(cfg)
    a, b = ord("a"), ord("b")  # the byte-level tokenizer: token = byte
    assert (
        cli(["trace", "--prompt", PROMPT, "--logit", "a", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    )
    assert "root: logit 'a' at token 23" in capsys.readouterr().out
    assert close(root_row(tmp_path / "a")["attribution"], float(logits[a]))
    argv = [
        "trace",
        "--prompt",
        PROMPT,
        "--logit",
        "a",
        "--vs",
        "b",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "d"),
    ]
    assert cli(argv) == 0
    assert close(root_row(tmp_path / "d")["attribution"], float(logits[a] - logits[b]))
    argv = [
        "trace",
        "--prompt",
        PROMPT,
        "--logit",
        "a",
        "--full",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "f"),
    ]
    assert cli(argv) == 0 and "full graph:" in capsys.readouterr().out
    assert close(root_row(tmp_path / "f")["attribution"], float(logits[a]))


def test_cli_without_layer_or_logit_roots_at_the_top_prediction(store, capsys):  # noqa: F811
    cfg, _, config = store
    from core.model import load_tokenizer

    top = load_tokenizer("tiny:ln").decode([int(model_logits(cfg).argmax())])
    assert cli(["trace", "--prompt", PROMPT, "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"root chosen: logit {top!r} (no --layer or --logit: the top prediction at token 23)" in text


def test_cli_path_filters_keep_the_matching_paths(store, tmp_path, capsys):  # noqa: F811
    _, _, config = store
    base = ["trace", "--prompt", PROMPT, "--layer", "1", "--feature", "3", "--config", str(config)]
    assert cli(base + ["--out", str(tmp_path / "all")]) == 0
    every = json.loads((tmp_path / "all" / "graph.json").read_text())["graphs"][0]["paths"]
    with_embed = [p for p in every if any(n.startswith("E@") for n in p["nodes"])]
    assert 0 < len(with_embed) < len(every)
    assert cli(base + ["--through", "E", "--out", str(tmp_path / "e")]) == 0
    kept = json.loads((tmp_path / "e" / "graph.json").read_text())["graphs"][0]["paths"]
    assert [p["nodes"] for p in kept] == [p["nodes"] for p in with_embed]
    assert cli(base + ["--not-through", "E", "--out", str(tmp_path / "n")]) == 0
    dropped = json.loads((tmp_path / "n" / "graph.json").read_text())["graphs"][0]["paths"]
    assert len(dropped) == len(every) - len(with_embed)
    assert cli(base + ["--through", "H1.0@0"]) == 0  # BOS sources are skipped: nothing matches
    assert "no path found: none of the paths" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--logit", "ab"], "--logit 'ab': encodes to 2 tokens"),
        (["--logit", "a", "--vs", "the"], "--vs 'the': encodes to 3 tokens"),
        (["--vs", "a"], "--vs needs --logit"),
        (["--logit", "a", "--layer", "1"], "--logit roots at a logit; drop --layer/--feature"),
        (["--feature", "3"], "--feature 3 needs --layer"),
        (["--layer", "1", "--through", "X1"], "node pattern 'X1': expected F[<layer>[.<feature>]][@pos]"),
        (["--logit", "a", "--pos", "30"], "--pos 30: out of range; the prompt has 24 tokens"),
    ],
)
def test_cli_bad_logit_or_filter_is_one_line(store, capsys, args, message):  # noqa: F811
    _, _, config = store
    assert cli(["trace", "--config", str(config), "--prompt", PROMPT] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_stage_traces_a_logit_difference_root(store):  # noqa: F811
    cfg, _, _ = store
    roots = (RootConfig(PROMPT, logit_diff=("a", "b")), RootConfig(PROMPT))
    cfg = dataclasses.replace(cfg, trace=dataclasses.replace(cfg.trace, roots=roots, full=False))
    plan = make_plan(cfg)
    summary = trace_roots.fn(cfg, plan.trace, plan.keys())
    first, second = summary["manifest"]["roots"]
    logits = model_logits(cfg)
    assert (first["logit"], first["vs"]) == ("a", "b")
    assert close(first["pre_activation"], float(logits[ord("a")] - logits[ord("b")]))
    assert second["logit_auto"] and close(second["pre_activation"], float(logits.max()))
    assert layout.is_complete(layout.stage_dir(cfg.store.root, "trace", plan.trace))


def test_config_rejects_mixed_roots():
    with pytest.raises(ConfigError, match="a logit root takes no `layer`"):
        RootConfig("x", layer=1, logit="a")
    with pytest.raises(ConfigError, match="give two tokens"):
        RootConfig("x", logit_diff=("a",))
    with pytest.raises(ConfigError, match="needs its `layer`"):
        RootConfig("x", feature=3)


def test_cli_cap_heads_searches_with_the_originals_cap(store, tmp_path):  # noqa: F811
    """--cap-heads passes n_heads as the head cap (recorded in graph.json) and keeps at most that many
    (head, source) children of one layer per parent; with signed ranking (the original's) too."""
    from core.model import load_model

    _, _, config = store
    n_heads = load_model("tiny:ln", device="cpu").cfg.n_heads
    base = ["trace", "--prompt", PROMPT, "--layer", "1", "--feature", "3", "--config", str(config)]
    assert cli(base + ["--cap-heads", "--set", "trace.signed=true", "--out", str(tmp_path / "c")]) == 0
    graph = json.loads((tmp_path / "c" / "graph.json").read_text())["graphs"][0]
    assert graph["meta"]["head_cap"] == n_heads
    children: dict[tuple, list[str]] = {}
    for p in graph["paths"]:
        children.setdefault(tuple(p["nodes"][:-1]), []).append(p["nodes"][-1])
    for kids in children.values():
        layers = [k.split(".")[0] for k in kids if k.startswith("H")]
        assert all(layers.count(x) <= n_heads for x in layers)

"""`circuitflow intervene` on a tiny model whose transcoders sit in a store the way training leaves them."""

from __future__ import annotations

import json

import pytest
import torch

from core import attribution, graph
from core.model import load_model
from flows.cli import main as cli
from tasks.trace import encode_prompt, load_transcoders
from tests.tasks.test_trace_stage import PROMPT, store  # noqa: F401 (the tiny store fixture)


def intervene(capsys, config, *args):
    code = cli(["intervene", "--prompt", PROMPT, "--config", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_no_intervention_changes_nothing(store, capsys):  # noqa: F811
    _, _, config = store
    code, out, _ = intervene(capsys, config, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["kl"] < 1e-9 and report["feature_changes"] == []
    assert report["clean_logprob"] == report["patched_logprob"]
    assert all(c["before"] == c["after"] for c in report["top_changes"])


def test_ablation_reports_the_root_against_its_total_attribution(store, capsys):  # noqa: F811
    """The linearised change of the root equals minus the source's total attribution in the full graph."""
    cfg, plan, config = store
    transcoders = load_transcoders(cfg, plan.keys())
    model = load_model("tiny:ln", "cpu", "float32")
    tokens = encode_prompt(cfg, PROMPT).tokens
    state = attribution.prepare(model, transcoders, tokens, max_layer=1, dtype=torch.float64)
    root = attribution.feature_root(state, 1, 3, -1)
    full = graph.full_graph(state, [root])
    source = max(full.nodes[: full.n_features], key=lambda n: abs(n.attribution))
    code, out, _ = intervene(
        capsys, config, "--ablate", f"{source.layer}:{source.feature}@{source.pos}", "--root", "1:3", "--format", "json"
    )
    r = json.loads(out)["root"]
    assert code == 0 and (r["layer"], r["feature"], r["pos"]) == (1, 3, len(tokens) - 1)
    assert r["linearised_change"] == pytest.approx(-source.attribution, rel=1e-4, abs=1e-5)
    assert r["ratio"] == pytest.approx(r["change"] / r["linearised_change"], rel=1e-9)
    code, text, _ = intervene(
        capsys, config, "--ablate", f"{source.layer}:{source.feature}@{source.pos}", "--root", "1:3"
    )
    assert code == 0 and f"real/linearised ratio {r['ratio']:.4f}" in text


def test_table_output_steering_and_generation(store, capsys):  # noqa: F811
    _, _, config = store
    code, out, _ = intervene(capsys, config, "--steer", "1:3=20", "--ablate-head", "1.2", "--generate", "4")
    assert code == 0
    assert "interventions: --steer 1:3=20, --ablate-head 1.2" in out and "KL(clean || intervened)" in out
    assert "generated, clean:" in out and "generated, intervened:" in out and "feature activations" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ablate", "1:999"], "--ablate 1:999: feature 999 is out of range; layer 1's transcoder has 0..127"),
        (["--clamp", "5:1=2"], "--clamp 5:1=2: layer 5 is out of range; the model has 0..1"),
        (["--ablate", "0:1@40"], "--ablate 0:1@40: position 40 is out of range; the prompt has 24 tokens"),
        (["--clamp", "0:1=x"], "--clamp '0:1=x': malformed; expected L:F=VALUE[@pos]"),
        (["--ablate-head", "1.9"], "--ablate-head 1.9: head 9 is out of range"),
        (["--root", "1:3@-30"], "--root 1:3@-30: position -30 is out of range"),
        (["--frozen", "--generate", "3"], "drop --frozen to generate"),
        (["--target", "the cat"], "give text that is exactly one token"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(store, capsys, monkeypatch, args, message):  # noqa: F811
    _, _, config = store

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("core.model.load_model", no_model)
    code, _, err = intervene(capsys, config, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_layer_without_transcoder_is_refused(store):  # noqa: F811
    from core.experiment_config import ExperimentConfig
    from core.interventions import InterventionError
    from tasks.intervene import prepare_experiment

    cfg, plan, _ = store
    only_0 = {0: load_transcoders(cfg, plan.keys())[0]}
    exp = ExperimentConfig(PROMPT, steer=("1:1=2",))
    with pytest.raises(InterventionError, match="--steer 1:1=2: layer 1 has no transcoder; layers with one: 0"):
        prepare_experiment("tiny:ln", only_0, exp, encode_prompt(cfg, PROMPT), "x")

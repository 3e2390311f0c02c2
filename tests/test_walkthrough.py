"""examples/walkthrough.py end to end: the real pipeline builds a small store on the bundled SmolLM2
(transcoders on layers 0-3, sized to train in about a minute), then the walkthrough runs against it.

The walkthrough asserts its own checks (the mined activation reproduces, transcoders beat zero-ablated
MLPs, a root equals the sum of its incoming edges, ablating a feature moves the root by exactly its
direct edge / total attribution when patterns, norm scales and the rest of the (replacement) model are
frozen, to 1e-4 of the root's scale); this test checks that it ran all of them and that the trace stage
chose the same automatic root. The real-model ablation is reported, not asserted: it is approximate.
Never skipped: without the bundled model's GGUF it fails with the install command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.model import ModelUnavailableError, bundled_gguf_path
from flows.pipeline import pipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The function returns a list of strings, one for each line of the file."
SMALL = {
    "model": {"name": "bundled:smollm2-135m", "device": "cpu"},
    "corpus": {"source": "bundled:docstrings", "max_docs": 200},
    "tokens": {"context_size": 64, "train_rows": 64, "mine_rows": 16},  # ~4k training tokens
    "activations": {"layers": [0, 1, 2, 3]},
    "train": {
        "activation": "topk", "k": 16, "expansion_factor": 1, "batch_size": 256, "epochs": 1,
        "warmup_steps": 2, "eval_ce_rows": 0, "init_tokens": 1024, "resample_tokens": 1024,
    },
    "mine": {"top_k": 5, "num_bands": 2, "per_band": 1, "dashboard_pages": 0},
    "trace": {"roots": [{"prompt": PROMPT, "layer": 3}], "max_features": 256},  # the root is chosen at trace time
    "feature_inputs": {"roots": True, "max_contexts": 6},  # the case study's dataset-level attribution
    "runner": {"max_workers": 2, "torch_threads": 1},
}  # fmt: skip

pytestmark = [pytest.mark.prefect, pytest.mark.bundled]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, prefect_harness) -> Path:
    """A store built by the pipeline from SMALL: every stage, the trace root chosen automatically."""
    try:
        bundled_gguf_path(SMALL["model"]["name"])
    except ModelUnavailableError as err:
        pytest.fail(f"the walkthrough test needs the bundled model: {err}")
    base = tmp_path_factory.mktemp("walkthrough")
    config = base / "small.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "store": {"root": str(base / "store")}}))
    summaries = pipeline(config=str(config))
    assert {s["stage"] for s in summaries} >= {"tokens", "activations", "train", "mine", "trace"}
    return base / "store"


@pytest.fixture(scope="module")
def walkthrough(small_store, tmp_path_factory) -> tuple[str, Path]:
    """The walkthrough's stdout on the small store, and the folder its graphs went to."""
    out_dir = tmp_path_factory.mktemp("walkthrough-out")
    env = {**os.environ, "CIRCUITFLOW_WALKTHROUGH_OUT": str(out_dir)}
    env["CIRCUITFLOW_THREADS"] = os.environ.get("CIRCUITFLOW_TEST_THREADS", "1")
    env.pop("CIRCUITFLOW_STORE", None)  # the argument wins anyway; make sure it is the one used
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "walkthrough.py"), str(small_store)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, out_dir


def test_walkthrough_runs_on_a_small_store(small_store, walkthrough):
    out, tmp_path = walkthrough
    assert f"store {small_store}:" in out

    trace = json.loads((small_store / "runs" / "latest.json").read_text())["plan"]["trace"]
    stage_root = json.loads((small_store / "trace" / trace / "manifest.json").read_text())["roots"][0]
    assert stage_root["feature_auto"] is True
    chosen = re.search(r"root F3\.(\d+)@(\d+) ", out)
    assert chosen and (int(chosen[1]), int(chosen[2])) == (stage_root["feature"], stage_root["pos"])
    assert f"feature {stage_root['feature']} (chosen automatically)" in out

    assert "CE clean" in out and "sum of the root's incoming edges" in out and "error terms of the root" in out
    traced = re.search(r"full graph: (\d+) of (\d+) active features traced", out)
    assert traced and traced[1] == traced[2]  # every feature traced, so the total attribution is checked
    # the top path's source: direct and linearised ablations vs their exact predictions (float32: ~1e-6)
    gaps = [float(g) for g in re.findall(r"predicted [-+][\d.]+ \(off by ([\d.e+-]+)\)", out)]
    assert len(gaps) == 2 and max(gaps) < 1e-4
    table = re.search(r"(\d) of (\d) survive in the real model", out)
    assert table and int(table[2]) >= 2  # the same for several sources; real-model survival is reported only
    largest = re.search(r"largest gap between a frozen model and its exact prediction: ([\d.e+-]+)", out)
    assert largest and float(largest[1]) < 1e-4
    assert "real model: " in out and "pullback's top 20" in out
    assert (tmp_path / "graph.html").is_file()


def _intervene(store: Path, *args: str) -> str:
    """`circuitflow intervene` on the walkthrough's prompt and the store's latest run, as a user runs it."""
    env = {**os.environ, "CIRCUITFLOW_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "intervene", "--prompt", PROMPT, "--store", str(store), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_intervene_reproduces_the_walkthrough_ablation(small_store, walkthrough, capsys):
    """No intervention: KL 0 (in process, to save a model load). Ablating the top path's source (as a
    user runs it): the root moves as in the walkthrough's real model, and the real/linearised ratio is
    the real/attributed ratio the walkthrough prints."""
    from flows.cli import main as cli

    assert cli(["intervene", "--prompt", PROMPT, "--store", str(small_store), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["kl"] < 1e-6
    out, _ = walkthrough
    root = re.search(r"root F3\.(\d+)@(\d+) ", out)
    source = re.search(r"source F(\d+)\.(\d+)@(\d+) ", out)
    real = re.search(r"real model: ([-+][\d.]+) = ([-\d.]+) x the attributed total", out)
    assert root and source and real, out[-2000:]
    text = _intervene(
        small_store, "--ablate", f"{source[1]}:{source[2]}@{source[3]}", "--root", f"3:{root[1]}@{root[2]}"
    )
    change = re.search(
        r"\(change ([-+][\d.]+)\); linearised change ([-+][\d.]+); real/linearised ratio ([-\d.]+)", text
    )
    assert change, text
    assert abs(float(change[1]) - float(real[1])) <= 2e-4  # the walkthrough prints 4 decimals
    assert abs(float(change[3]) - float(real[2])) <= 0.006  # ... and the ratio with 2


def test_case_study_conclusion_follows_from_its_numbers(small_store):
    env = {**os.environ, "CIRCUITFLOW_THREADS": os.environ.get("CIRCUITFLOW_TEST_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "case_study.py"), str(small_store)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "HYPOTHESIS:" in out and "mean attribution by source kind (the feature_inputs table, 6 contexts)" in out
    gap = re.search(r"feature_inputs vs the per-context recomputation here: largest \|difference\| ([\d.e+-]+)", out)
    assert gap and float(gap[1]) < 1e-4  # float32 sums of the same decomposition
    removed = float(re.search(r"activation removed: ([-\d.]+)%", out)[1])
    control = float(re.search(r"control \(\d+ other active upstream features\): ([-\d.]+)%", out)[1])
    verdict = re.search(r"CONCLUSION: the hypothesis is (SUPPORTED|REFUTED)", out)[1]
    assert verdict == ("SUPPORTED" if removed >= 50 and removed >= 2 * max(control, 0) else "REFUTED")
    clean = float(re.search(r"promoted tokens after .*: clean ([\d.]+)", out)[1])
    strongest = float(re.findall(r"steered by +\d+ x max activation: ([\d.]+)", out)[-1])
    assert ("raises the probability" in out) == (strongest > clean)
    assert "steered: " in out

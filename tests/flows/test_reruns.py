"""Rerun semantics of the whole pipeline on a tiny model: a changed setting reruns exactly the stages
whose key changes (and what reads them), `--force` recomputes a stage and its readers, artifacts are
reused when Prefect's results are gone, a missing artifact is rebuilt, and the CLI prints a summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.config import load_config
from flows.cli import main as cli_main
from flows.pipeline import pipeline
from storage import layout
from storage.checkpoints import load_transcoder, load_transcoders
from tasks.plan import make_plan
from tests.corpora import PROSE, write_corpus
from tests.tiny_pipeline import tiny_pipeline_config

pytestmark = pytest.mark.prefect
ROOT = Path(__file__).resolve().parents[2]

OTHER = "Mining on another corpus changes which examples rank highest, but not the transcoders themselves. "
LABELS = ["tokens[train]", "tokens[mine]", "activations", "train[0]", "train[1]", "evaluate", "mine", "trace"]
"""Every task run of the tiny pipeline (evaluate: both transcoders spliced in at once)."""
RETRAIN = {"train[0]", "train[1]", "evaluate", "mine", "trace"}


def _write_corpus(folder, text: str, n: int) -> str:
    return str(write_corpus(folder, n, text))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config (two layers, one trace root), its store, and a second corpus for mining."""
    base = tmp_path_factory.mktemp("reruns")
    cfg = tiny_pipeline_config(_write_corpus(base / "corpus", PROSE, 60), base / "store")
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, base / "store", _write_corpus(base / "other", OTHER, 12)


def statuses(summaries: list[dict]) -> dict[str, str]:
    """label -> ran/cached, one entry per task run (tokens labelled by what they are for)."""
    out = {}
    for s in summaries:
        if s["stage"] == "tokens":
            label = "tokens[train]" if s["manifest"]["split"] == "train" else "tokens[mine]"
        elif s["stage"] == "train":
            label = f"train[{s['layer']}]"
        else:
            label = s["stage"]
        assert label not in out, f"{label} ran twice in one pipeline run"
        out[label] = s["status"]
    return out


def expect(ran: set[str]) -> dict[str, str]:
    return {label: "ran" if label in ran else "cached" for label in LABELS}


def created(store, stage: str, key: str) -> int:
    """When a stage's artifact was published (its manifest's mtime, ns)."""
    return (layout.stage_dir(store, stage, key) / layout.MANIFEST).stat().st_mtime_ns


def table(out: str) -> list[list[str]]:
    """The rows of `circuitflow run`'s summary table: label, status, seconds, path."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "status"])
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("total "):
            return rows
        rows.append(line.split())
    raise AssertionError(f"no total line in:\n{out}")


def test_change_one_setting_reruns_exactly_what_depends_on_it(prefect_harness, tiny):
    config, store, other = tiny
    run = lambda *sets, force=None: statuses(pipeline(config=str(config), overrides=list(sets), force=force))  # noqa: E731

    assert run() == expect(set(LABELS))
    assert run() == expect(set())
    base = make_plan(load_config(config))
    stamps = {stage: created(store, stage, base.keys()[stage]) for stage in ("activations", "mine", "trace")}

    # A new l1 coefficient: same tokens and activations; new transcoders, so new mining and tracing.
    summaries = pipeline(config=str(config), overrides=["train.l1_coefficient=0.003"])
    assert statuses(summaries) == expect(RETRAIN)
    reasons = {(s["stage"], s.get("layer")): s["reason"] for s in summaries if s["status"] == "ran"}
    assert reasons[("train", 0)] == reasons[("train", 1)] == "config changed (train: l1_coefficient)"
    assert reasons[("mine", None)] == "upstream key changed (train_0, train_1)"  # as `circuitflow plan` says
    l1 = make_plan(load_config(config, ["train.l1_coefficient=0.003"]))
    assert l1.activations == base.activations and set(l1.train.values()).isdisjoint(base.train.values())

    # A new mining corpus: only the mining tokens and the mining rerun. Tracing reads the model,
    # the transcoders and the prompt, none of which changed, so its key and artifact stay.
    assert run(f"mine.corpus={other}") == expect({"tokens[mine]", "mine"})
    mined = make_plan(load_config(config, [f"mine.corpus={other}"]))
    assert (mined.tokens_train, mined.trace) == (base.tokens_train, base.trace) and mined.mine != base.mine

    # The base config again: everything is still there.
    assert run() == expect(set())
    assert {stage: created(store, stage, base.keys()[stage]) for stage in stamps} == stamps

    # --force train: the transcoders and their readers (mine, trace) are recomputed in place.
    assert run(force=["train"]) == expect(RETRAIN)
    assert created(store, "activations", base.activations) == stamps["activations"]
    assert created(store, "mine", base.mine) != stamps["mine"]
    assert run(force=["mine"]) == expect({"mine"})


def test_artifacts_outlive_prefect_results_and_missing_ones_are_rebuilt(prefect_harness, tiny):
    config, store, _ = tiny
    plan = make_plan(load_config(config))
    pipeline(config=str(config))  # complete (cached after the test above; a full run when run alone)

    # Prefect's persisted results are gone (as with a lost database): every manifest still counts.
    shutil.rmtree(store / ".prefect-results")
    assert statuses(pipeline(config=str(config))) == expect(set())

    # Prefect remembers the mine task, but its artifact is gone: it is rebuilt, nothing else is.
    assert statuses(pipeline(config=str(config))) == expect(set())  # results are persisted again
    shutil.rmtree(layout.stage_dir(store, "mine", plan.mine))
    assert statuses(pipeline(config=str(config))) == expect({"mine"})
    assert layout.is_complete(layout.stage_dir(store, "mine", plan.mine))


def test_cli_summary_and_the_fully_cached_fast_path(prefect_harness, tiny, capsys):
    config, store, _ = tiny
    plan = make_plan(load_config(config))
    pipeline(config=str(config))
    assert cli_main(["run", str(config), "--force", "trace"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert [r[0] for r in rows] == [
        "tokens",
        "tokens",
        "activations",
        "train[0]",
        "train[1]",
        "evaluate",
        "mine",
        "trace",
    ]
    assert [r[1] for r in rows] == ["cached"] * 7 + ["ran"]
    assert rows[-1][3] == str(layout.stage_dir(store, "trace", plan.trace))
    assert rows[-1][4:] == ["(ran:", "forced)"]  # why it ran
    assert "Prefect was not started" not in out

    record = json.loads((store / "runs" / "latest.json").read_text())
    assert record["orchestrator"] == "prefect" and record["plan"]["trace"] == plan.trace
    assert [s["status"] for s in record["stages"]] == [r[1] for r in rows]

    # Everything is in the store and nothing is forced: the summary comes from the manifests.
    assert cli_main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Prefect was not started" in out
    assert [r[:2] for r in table(out)] == [[r[0], "cached"] for r in rows]
    assert [r[3] for r in table(out)] == [r[3] for r in rows]
    assert all(len(r) == 4 for r in table(out)), out  # a cache hit carries no reason to run
    record = json.loads((store / "runs" / "latest.json").read_text())
    assert record["orchestrator"] == "none" and len(record["stages"]) == len(LABELS)

    # An artifact the last run used is gone: the fast path is not taken and the stage is rebuilt.
    shutil.rmtree(layout.stage_dir(store, "trace", plan.trace))
    assert cli_main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Prefect was not started" not in out
    assert [r[1] for r in table(out)] == ["cached"] * 7 + ["ran"]


PLAN_LABELS = ["tokens[train]", "tokens[mine]", "activations", "train[0]", "train[1]", "evaluate", "mine", "trace"]
CODE_EDITS = {
    "core/mining.py": {"mine"},
    "core/train.py": {"train[0]", "train[1]", "evaluate"},
    "core/graph.py": {"trace"},
    "storage/formats/saelens.py": {"train[0]", "train[1]", "evaluate", "mine", "trace"},
}
"""A comment appended to the file: the stages whose code covers it (the rest of what reruns reads them)."""


def plan_cli(config, *args: str, checkout: Path = ROOT) -> dict[str, str]:
    """`circuitflow plan --format json` run from `checkout` (a copy of the code): {stage: status[: reason]}."""
    cmd = [sys.executable, "-m", "flows.cli", "plan", str(config), "--format", "json", *args]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert all(set(r) >= {"stage", "key", "status", "reason"} for r in rows)
    return {r["stage"]: r["status"] if r["status"] == "cached" else f"{r['status']}: {r['reason']}" for r in rows}


def test_plan_says_what_will_run_and_why(prefect_harness, tiny, tmp_path):
    config, store, _ = tiny
    fresh = plan_cli(config, "--store", str(tmp_path / "empty"))
    assert fresh == dict.fromkeys(PLAN_LABELS, "will run: not in the store")
    pipeline(config=str(config))
    assert plan_cli(config) == dict.fromkeys(PLAN_LABELS, "cached")

    copy = tmp_path / "checkout"
    for package in ("core", "storage", "tasks", "flows"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file, covers in CODE_EDITS.items():
        original = (copy / file).read_text()
        (copy / file).write_text(original + "# a comment: same behaviour, new code version\n")
        found = plan_cli(config, checkout=copy)
        (copy / file).write_text(original)
        readers = {"mine", "trace"} if "train[0]" in covers else set()
        for stage in PLAN_LABELS:
            if stage in covers:
                assert found[stage].startswith("will run") and f"code changed ({file})" in found[stage], (file, found)
            elif stage in readers:
                assert found[stage] == "will run: upstream key changed (train_0, train_1)", (file, found)
            else:
                assert found[stage] == "cached", (file, found)


def test_the_trained_transcoders_travel_exactly_to_saelens_and_circuit_tracer(prefect_harness, tiny, tmp_path):
    """Batch top-k (the default's activation) trains a JumpReLU transcoder: `circuitflow convert` writes
    both other layouts without refusal and each reads back computing the same outputs (float32, 1e-5)."""
    config, store, _ = tiny
    pipeline(config=str(config))
    src = layout.stage_dir(store, "train", make_plan(load_config(config)).train[0])
    original = load_transcoder(src)
    threshold = original.threshold
    assert original.cfg.activation == "jumprelu" and threshold is not None and float(threshold.min()) > 0
    u = torch.randn(256, original.cfg.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(u)
    assert 0 < float((want.feature_acts > 0).sum(-1).float().mean()) < original.cfg.d_sae / 2
    for to in ("saelens", "circuit-tracer"):
        cmd = [sys.executable, "-m", "flows.cli", "convert", str(src), str(tmp_path / to), "--to", to]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        back = load_transcoders(tmp_path / to)[0]
        with torch.no_grad():
            got = back(u)
        assert float((got.out - want.out).abs().max()) < 1e-5, to
        assert torch.equal(got.feature_acts > 0, want.feature_acts > 0), to

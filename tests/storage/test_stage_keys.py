"""Stage keys cover what each stage computes with, and nothing else.

Table-driven: for every source file of core/, storage/ and tasks/, a copy of the checkout gets one comment
line appended to that file, and the pipeline's keys (tasks.plan.make_plan) are recomputed. Exactly the
stages listed below for the file (and the stages that read them) must get a new key; every other key must
stay byte-identical. A new module that the table does not list fails the test until it is classified.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.config import from_dict
from storage import stagecode
from tasks.plan import make_plan
from tests.corpora import write_corpus

ROOT = Path(__file__).resolve().parents[2]
EVERY = frozenset({"tokens", "activations", "train", "mine", "trace", "feature_inputs"})
READERS = {
    "tokens": EVERY,
    "activations": {"train", "mine", "trace", "feature_inputs"},
    "train": {"mine", "trace", "feature_inputs"},
    "mine": {"feature_inputs"},
}
"""Each stage and the stages whose keys include its key, directly or not (tasks.plan)."""
FORMATS = {"train", "mine", "trace", "feature_inputs"}
"""Stages that read or write transcoder files (train writes native, the others read any format)."""
TRACING = {"trace", "feature_inputs"}
"""Stages that run the attribution (both share tasks/trace_inputs.py)."""
COMPUTES: dict[str, set[str]] = {
    "core/__init__.py": set(EVERY),
    "core/activations.py": {"activations"},
    "core/attribution.py": TRACING,
    "core/attribution_state.py": TRACING,
    "core/batches.py": {"train"},
    "core/blind.py": set(),
    "core/circuit.py": TRACING,
    "core/config_base.py": set(),
    "core/config_convert.py": set(),
    "core/config_data.py": set(),
    "core/config_trace.py": set(),
    "core/config_train.py": set(),
    "core/dataset_attribution.py": {"feature_inputs"},
    "core/experiment_config.py": set(),
    "core/intervention_hooks.py": set(),  # experiments are not part of the pipeline
    "core/intervention_spec.py": set(),
    "core/interventions.py": set(),
    "core/losses.py": {"train"},
    "core/paths.py": {"trace"},
    "core/topk.py": {"train"},
    "core/train_state.py": {"train"},
    "core/train_steps.py": {"train"},  # the blind stage is not part of the pipeline
    "core/config.py": set(),  # settings enter the keys by value
    "core/corpus.py": {"tokens"},
    "core/errors.py": set(),
    "core/graph.py": {"trace"},
    "core/graph_data.py": {"trace"},
    "core/graph_prune.py": {"trace"},
    "core/metrics.py": {"train"},
    "core/mining.py": {"mine"},
    "core/model.py": set(EVERY),  # loads the tokenizer and the model
    "core/model_bundled.py": set(EVERY),
    "core/model_gguf.py": set(EVERY),
    "core/model_hub.py": set(EVERY),
    "core/model_tiny.py": set(EVERY),
    "core/model_tl.py": set(EVERY),
    "core/ratings.py": set(),
    "core/streaming.py": set(),  # pairs without a cache: tests and benchmarks
    "core/tokenizer.py": set(EVERY),
    "core/train.py": {"train"},
    "core/transcoder.py": FORMATS,
    "core/views.py": {"mine"},
    "storage/__init__.py": set(EVERY),
    "storage/blind.py": set(),
    "storage/catalog.py": set(),  # the store-wide views: `circuitflow sql`, `serve`
    "storage/duck.py": {"mine", "feature_inputs"},  # both read the mined tables through SQL
    "storage/checkpoints.py": FORMATS,
    "storage/dashboard.py": {"mine"},
    "storage/dashboard_index.py": {"mine"},
    "storage/dashboard_text.py": set(),
    "storage/feature_inputs.py": {"feature_inputs"},
    "storage/interventions.py": set(),
    "storage/graphs.py": {"trace"},
    "storage/layout.py": set(),
    "storage/links.py": set(),
    "storage/provenance.py": set(),
    "storage/runs.py": {"trace"},  # tracing may reuse the last run's transcoders
    "storage/shards.py": {"activations", "train"},
    "storage/stagecode.py": set(),
    "storage/tables.py": set(EVERY),
    "storage/training.py": {"train"},
    "storage/web.py": set(),
    "tasks/__init__.py": set(EVERY),
    "tasks/activations.py": {"activations"},
    "tasks/blind.py": set(),
    "tasks/common.py": set(),
    "tasks/evaluate.py": {"train"},  # a layer's evaluation runs inside its train stage
    "tasks/feature_chunks.py": {"mine"},
    "tasks/feature_inputs.py": {"feature_inputs"},
    "tasks/intervene.py": set(),
    "tasks/locking.py": set(),
    "tasks/interventions.py": set(),
    "tasks/mine.py": {"mine"},
    "tasks/plan.py": set(),
    "tasks/preflight.py": set(),
    "tasks/sweep.py": set(),
    "tasks/tokens.py": {"tokens"},
    "tasks/trace.py": {"trace"},
    "tasks/trace_inputs.py": TRACING,
    "tasks/train.py": {"train"},
    "tasks/train_progress.py": set(),
    "tasks/train_report.py": {"train"},  # the training curves are part of the artifact
    "tasks/transcoders.py": FORMATS - {"train"},
}
for _format in (ROOT / "storage" / "formats").glob("*.py"):
    COMPUTES[f"storage/formats/{_format.name}"] = FORMATS


def sources() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix() for pkg in stagecode.PROJECT_PACKAGES for p in (ROOT / pkg).rglob("*.py")
    )


def expected_changes(file: str) -> set[str]:
    direct = COMPUTES[file]
    return set(direct).union(*(READERS.get(stage, set()) for stage in direct))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the project packages, and a config whose keys make_plan derives without a model."""
    base = tmp_path_factory.mktemp("keys")
    for pkg in stagecode.PROJECT_PACKAGES:
        shutil.copytree(ROOT / pkg, base / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    corpus = write_corpus(base / "corpus", 4)
    cfg = from_dict(
        {
            "model": {"name": "tiny:ln", "device": "cpu"},
            "corpus": {"source": str(corpus)},
            "activations": {"layers": [0, 1]},
            "store": {"root": str(base / "store")},
        }
    )
    return base / "src", cfg


def stage_keys(cfg) -> dict[str, tuple]:
    stagecode.code_version.cache_clear()
    plan = make_plan(cfg)
    return {
        "tokens": (plan.tokens_train, plan.tokens_mine),
        "activations": (plan.activations,),
        "train": tuple(sorted(plan.train.items())),
        "mine": (plan.mine,),
        "trace": (plan.trace,),
        "feature_inputs": (plan.feature_inputs,),
    }


def test_every_source_file_is_classified():
    assert sorted(set(sources()) - set(COMPUTES)) == [], "add the new module to COMPUTES"
    assert sorted(set(COMPUTES) - set(sources())) == [], "remove the deleted module from COMPUTES"


def test_editing_a_module_changes_exactly_the_keys_of_the_stages_computing_with_it(checkout, monkeypatch):
    src, cfg = checkout
    monkeypatch.setattr(stagecode, "_PACKAGE_ROOT", src)
    before = stage_keys(cfg)
    wrong = {}
    for file in sources():
        path = src / file
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit that changes no behaviour\n")
        try:
            after = stage_keys(cfg)
        finally:
            path.write_bytes(original)
        changed = {stage for stage in before if after[stage] != before[stage]}
        if changed != expected_changes(file):
            wrong[file] = {"changed": sorted(changed), "expected": sorted(expected_changes(file))}
    assert wrong == {}
    assert stage_keys(cfg) == before  # restored files give the same keys again
    stagecode.code_version.cache_clear()


def test_type_only_imports_do_not_count(tmp_path, monkeypatch):
    for package in ("core", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "core" / "used.py").write_text("x = 1\n")
    (tmp_path / "core" / "typed.py").write_text("y = 1\n")
    (tmp_path / "tasks" / "demo.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from core.typed import y\n"
        "def run():\n    from core.used import x\n"
    )
    monkeypatch.setattr(stagecode, "_PACKAGE_ROOT", tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in stagecode.source_closure("tasks.demo")}
    assert names == {"tasks/demo.py", "tasks/__init__.py", "core/used.py", "core/__init__.py"}

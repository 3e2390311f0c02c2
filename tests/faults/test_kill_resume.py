"""kill -9 inside every stage, then rerun: the final artifacts equal an uninterrupted run's (Parquet tables and
safetensors tensors bit for bit), no `<stage>/<key>/` is ever visible without its manifest or with a torn file,
and DuckDB (storage.catalog.query) reads the same rows as the uninterrupted run right after every kill.

The kills come from the driver process of tests/faults/kill_driver.py; each child resumes what the last one left.
test_kill_forced.py kills a forced publish, test_kill_cli.py the real `circuitflow run` (Prefect).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.plan import STAGES, Plan
from tests.faults.conftest import Reference, assert_nothing_partial, assert_same_run, stage_dirs
from tests.faults.kill_driver import Driver, Kill
from tests.faults.store_readers import assert_readers_see_whole_artifacts, check, debris, reader_counts, seed_run_record

# ---------------------------------------------------------------- kill points, in pipeline order

KILLS = [
    Kill("tokens", "tokens.parquet written in <key>.tmp-*, vocab.parquet not yet", "tasks.tokens:write_table"),
    Kill("tokens", "vocab.parquet torn half-way (its hidden temp file)", "pyarrow.parquet:write_table", 2, "torn"),
    Kill("tokens", "the temp dir is complete with its manifest but not renamed", "storage.layout:publish", 1, "before"),
    Kill("activations", "shard 1 committed at layer 0, its layer-1 file still a hidden temp file",
         "storage.shards:ShardFile.commit", 4, "before"),
    Kill("activations", "external kill once shard 2, 3 or 4 of layer 1 exists (timing not chosen)",
         poll="activations/{activations}.partial/layer=1/pairs-0000[234].safetensors"),
    Kill("activations", "every shard written, the scratch dir has its manifest, not yet renamed",
         "storage.layout:publish", 1, "before"),
    Kill("train", "layer 0 killed right after its step-3 checkpoint", "tasks.train:save_checkpoint", 3),
    Kill("train", "a checkpoint torn half-way (hidden temp file; the previous one intact)",
         "storage.training:save_tensors", 2, "torn"),
    Kill("train", "layer 0 trained, killed in its evaluation", "tasks.train:evaluate_layer", 1, "before"),
    Kill("train", "weights written into <key>.tmp-*, metrics not yet", "tasks.train:metrics_table", 1, "before"),
    Kill("train", "external kill once layer 1 has a checkpoint", poll="train/{train_1}.partial/checkpoint.safetensors"),
    Kill("train", "layer 1's complete temp dir not yet renamed", "storage.layout:publish", 1, "before"),
    Kill("mine", "the first feature_acts part written", "storage.tables:write_feature_acts"),
    Kill("mine", "pass 2: the first row group of feature_stats written", "storage.tables:TableSink.write"),
    Kill("mine", "the first dashboard page written", "storage.dashboard:write_html"),
    Kill("trace", "nodes.parquet written, edges.parquet not yet", "storage.graphs:write_table"),
    Kill("trace", "the complete temp dir not yet renamed", "storage.layout:publish", 1, "before"),
    Kill("feature_inputs", "feature_inputs.parquet torn half-way (its hidden temp file)",
         "pyarrow.parquet:write_table", 1, "torn", "feature_inputs"),
]  # fmt: skip


@dataclass
class KillRecord:
    kill: Kill
    reply: dict[str, Any]
    partial_error: str | None
    reader_error: str | None
    counts: dict[str, int]


@dataclass
class Gauntlet:
    store: Path
    plan: Plan
    records: list[KillRecord]
    final: dict[str, Any]
    log: Path


def _read_into(counts: dict[str, int], store: Path, reference: dict[str, int]) -> None:
    counts.update(assert_readers_see_whole_artifacts(store, reference))


@pytest.fixture(scope="module")
def reference_counts(reference: Reference) -> dict[str, int]:
    return reader_counts(reference.store)


@pytest.fixture(scope="module")
def gauntlet(reference: Reference, reference_counts: dict[str, int], tmp_path_factory) -> Gauntlet:
    """One store, killed at every point of KILLS in turn (each child resuming the last), then run to the end."""
    base = tmp_path_factory.mktemp("kill-gauntlet")
    store = base / "store"
    config = reference.config_for(store)
    plan = seed_run_record(config, ["tokens"])
    assert plan == reference.plan
    keys = {"activations": plan.activations, **{f"train_{x}": k for x, k in plan.train.items()}}
    log = base / "driver.log"
    driver = Driver(log)
    records = []
    try:
        for kill in KILLS:
            if kill.poll:
                kill = Kill(kill.stage, kill.what, poll=kill.poll.format(**keys))
            reply = driver.run(config, store, plan, kill)
            partial = check(assert_nothing_partial, store)
            counts: dict[str, int] = {}
            reader = check(_read_into, counts, store, reference_counts)
            records.append(KillRecord(kill, reply, partial, reader, counts))
        final = driver.run(config, store, plan)
    finally:
        driver.close()
    return Gauntlet(store, plan, records, final, log)


@pytest.mark.parametrize("index", range(len(KILLS)), ids=[f"{k.stage}-{i}" for i, k in enumerate(KILLS)])
def test_kill_lands_and_leaves_nothing_partial_or_misread(gauntlet: Gauntlet, index: int) -> None:
    record = gauntlet.records[index]
    assert record.reply["signal"] == signal.SIGKILL, (
        f"{record.kill.what}: the child was not killed there ({record.reply}); see {gauntlet.log}"
    )
    assert record.partial_error is None, record.partial_error
    assert record.reader_error is None, record.reader_error
    assert record.reply["scans"] > 0 and not record.reply["unfinished_seen"], record.reply


def test_every_stage_is_killed_and_readers_grow_with_the_stages(gauntlet: Gauntlet) -> None:
    """The kills cover every stage, and what DuckDB sees only ever grows from one kill to the next."""
    assert {r.kill.stage for r in gauntlet.records} == set(STAGES)
    seen: dict[str, int] = {}
    for r in gauntlet.records:
        assert seen.items() <= r.counts.items(), f"{r.kill.what}: a view changed or vanished: {seen} -> {r.counts}"
        seen = r.counts
    assert not gauntlet.records[0].counts  # killed in the first tokens split: no view yet
    assert set(seen) >= {"tokens", "train_tokens", "feature_acts", "feature_stats", "train_metrics[1]"}


def test_rerun_after_every_kill_equals_the_uninterrupted_run(gauntlet: Gauntlet, reference: Reference) -> None:
    assert gauntlet.final == {**gauntlet.final, "signal": None, "code": 0}, f"see {gauntlet.log}"
    assert not gauntlet.final["unfinished_seen"], gauntlet.final["unfinished_seen"]
    assert_same_run(gauntlet.store, gauntlet.plan, reference)
    assert assert_nothing_partial(gauntlet.store) == len(stage_dirs(gauntlet.store, gauntlet.plan)) + 1  # + evaluate


def test_no_debris_after_the_rerun(gauntlet: Gauntlet) -> None:
    leftovers = debris(gauntlet.store)
    assert not leftovers, f"left behind: {leftovers}"

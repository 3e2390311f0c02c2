"""A kill while `--force` replaces an artifact: killed right after the publish swapped the new artifact in, the
store still shows a complete artifact, and the rerun removes the displaced old one.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from storage import layout
from tests.faults.conftest import Reference, assert_nothing_partial, stage_dirs
from tests.faults.kill_driver import Driver, Kill
from tests.faults.store_readers import assert_readers_see_whole_artifacts, check, debris, reader_counts


@pytest.fixture(scope="module")
def reference_counts(reference: Reference) -> dict[str, int]:
    return reader_counts(reference.store)


@pytest.fixture(scope="module")
def forced(reference: Reference, reference_counts: dict[str, int], tmp_path_factory) -> dict[str, Any]:
    """A copy of the finished reference store; `--force tokens` killed right after layout.publish swapped the
    new artifact in (the old one, now under the temp name, not yet removed); then the same command rerun."""
    base = tmp_path_factory.mktemp("kill-forced")
    store = base / "store"
    shutil.copytree(reference.store, store)
    config = reference.config_for(store)
    driver = Driver(base / "driver.log")
    try:
        kill = Kill("tokens", "after the exchange of a forced publish", "storage.layout:exchange", 1, "after")
        reply = driver.run(config, store, reference.plan, kill, stages=["tokens"], force=["tokens"])
        partial = check(assert_nothing_partial, store)
        reader = check(assert_readers_see_whole_artifacts, store, reference_counts)
        complete = layout.is_complete(layout.stage_dir(store, "tokens", reference.plan.tokens_train))
        left = debris(store)
        rerun = driver.run(config, store, reference.plan, stages=["tokens"], force=["tokens"])
    finally:
        driver.close()
    return {"reply": reply, "partial": partial, "reader": reader, "complete": complete, "rerun": rerun, "store": store,
            "left": left, "debris": debris(store)}  # fmt: skip


def test_forced_publish_killed_midway_shows_nothing_partial_and_reruns(forced: dict[str, Any], reference) -> None:
    assert forced["reply"]["signal"] == signal.SIGKILL
    assert not forced["reply"]["unfinished_seen"] and not forced["rerun"]["unfinished_seen"]
    assert forced["partial"] is None, forced["partial"]
    assert forced["rerun"]["code"] == 0
    for label in ("tokens_train", "tokens_mine"):
        assert_same_artifact_dirs(forced["store"], reference, label)


def assert_same_artifact_dirs(store: Path, reference: Reference, label: str) -> None:
    from tests.faults.conftest import assert_same_artifact

    assert_same_artifact(stage_dirs(store, reference.plan)[label], stage_dirs(reference.store, reference.plan)[label])


def test_forced_publish_killed_midway_keeps_an_artifact_readable(forced: dict[str, Any]) -> None:
    assert forced["complete"], "the tokens artifact vanished"
    assert forced["reader"] is None, forced["reader"]


def test_forced_publish_killed_midway_leaves_debris_the_rerun_removes(forced: dict[str, Any]) -> None:
    """The kill leaves the displaced artifact under its temp name (so the kill landed where meant); the rerun,
    whose stage builds in the same folder, removes it."""
    assert [Path(p).parent.name for p in forced["left"]] == ["tokens"] and ".tmp-" in forced["left"][0], forced
    assert not forced["debris"], forced["debris"]

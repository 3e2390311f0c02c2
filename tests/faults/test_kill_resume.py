"""kill -9 inside every stage, then rerun: the final artifacts equal an uninterrupted run's (Parquet tables and
safetensors tensors bit for bit), no `<stage>/<key>/` is ever visible without its manifest or with a torn file,
and DuckDB (storage.catalog.query) reads the same rows as the uninterrupted run right after every kill.

The kills come from a driver process (this module run with `-m`): it imports the stages once, then forks one
child per kill point. A child runs the pipeline's stage tasks in order and is SIGKILLed either by itself at a
named call (no hook in the code under test: the child wraps the function) or by the driver when a file
appears in the store. Each child resumes what the last one left. A last test kills the real
`circuitflow run` (Prefect) mid-training and reruns it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.config import load_config
from storage import catalog, layout
from tasks.plan import STAGES, Plan
from tests.faults.conftest import (
    REPO,
    Reference,
    assert_nothing_partial,
    assert_same_run,
    run_stages,
    stage_dirs,
)

ARTIFACT_VIEWS = (
    "tokens", "vocab", "train_tokens", "feature_acts", "feature_stats", "top_examples", "feature_views", "feature_inputs",
)  # fmt: skip
"""Catalog views over stage artifacts (not the run records), compared by row count with the reference."""


@dataclass(frozen=True)
class Kill:
    """Where a child dies. `target` "module:attr" (or "module:Class.method") is wrapped so that its `call`-th
    call (counting calls whose path argument contains `match`) is followed by SIGKILL: `before` it runs,
    `after` it returns, or `torn`: after it returns, the file it wrote (its second argument) is cut in half.
    With `poll` instead, the driver kills the child as soon as a file matching the glob exists in the store."""

    stage: str
    what: str
    target: str = ""
    call: int = 1
    when: str = "after"
    match: str = ""
    poll: str = ""

    def request(self) -> dict[str, Any]:
        return {"target": self.target, "call": self.call, "when": self.when, "match": self.match}


# ---------------------------------------------------------------- the driver (a subprocess)


def serve() -> None:
    """Read one JSON request per line; fork a child per request; answer how it ended, one JSON line each."""
    import torch

    import tasks.activations
    import tasks.feature_inputs
    import tasks.mine
    import tasks.tokens
    import tasks.trace
    import tasks.train  # noqa: F401 - imported once here, shared by every forked child

    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(request)
        status, unfinished, scans = _watch(pid, request)
        reply = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": round(time.perf_counter() - start, 2),
            "unfinished_seen": unfinished,
            "scans": scans,
        }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _watch(pid: int, request: dict[str, Any]) -> tuple[int, list[str], int]:
    """Wait for the child, scanning the store all the while for an artifact directory without its manifest;
    with a poll glob, SIGKILL the child as soon as the glob matches. Returns (wait status, directories seen
    without a manifest, number of scans)."""
    store, pattern = Path(request["store"]), request.get("poll")
    unfinished: list[str] = []
    scans = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, unfinished, scans
        scans += 1
        unfinished += [str(p) for p in _visible_without_manifest(store) if str(p) not in unfinished]
        if pattern and any(store.glob(pattern)):
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], unfinished, scans
        time.sleep(0.002)


def _visible_without_manifest(store: Path) -> list[Path]:
    """`<stage>/<key>/` directories (no dot in the name) without a manifest at this instant (the same directory,
    by inode, before and after the look: a forced publish may swap in a complete one meanwhile)."""
    found = []
    try:
        stages = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "runs"]
        dirs = [c for stage in stages for c in stage.iterdir() if "." not in c.name]
        for d in dirs:
            inode = d.stat().st_ino
            if not (d / layout.MANIFEST).is_file() and d.stat().st_ino == inode:
                found.append(d)
    except FileNotFoundError:  # renamed away while looked at
        pass
    return found


def _child(request: dict[str, Any]) -> None:
    """Run the stages (dying where the request says); never returns."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        print(f"--- child {os.getpid()}: {request}", flush=True)
        if request.get("kill"):
            _arm(**request["kill"])
        keys = request["plan"]
        plan = Plan(**{**keys, "train": {int(k): v for k, v in keys["train"].items()}})
        run_stages(load_config(request["config"]), plan, tuple(request["stages"]), tuple(request.get("force", ())))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _arm(target: str, call: int, when: str, match: str) -> None:
    module, attr = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    seen = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        counts = not match or any(match in str(a) for a in args)
        seen += counts
        if counts and seen == call and when == "before":
            _die(f"before {target} call {call}")
        result = real(*args, **kwargs)
        if counts and seen == call:
            if when == "torn":
                path = Path(args[1])
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            _die(f"{when} {target} call {call}")
        return result

    setattr(owner, name, wrapper)


def _die(where: str) -> None:
    print(f"--- SIGKILL {where}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Driver:
    """The test's end of the driver process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.test_kill_resume"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, config: Path, store: Path, plan: Plan, kill: Kill | None = None, **extra: Any) -> dict[str, Any]:
        request = {"config": str(config), "store": str(store), "plan": plan.keys(), "log": str(self.log)}
        request.update({"stages": list(STAGES), **extra})
        if kill is not None and kill.poll:
            request["poll"] = kill.poll
        elif kill is not None:
            request["kill"] = kill.request()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the driver died; see {self.log}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------- what readers see


def seed_run_record(config: Path, stages: list[str], fresh: bool = False) -> Plan:
    """A run record naming this config's plan (as a finished `circuitflow run --stages tokens` leaves it), so the
    catalog views point at the keys being built; returns the plan. `fresh`: keys from the code on disk now (what a
    new CLI process computes), not this process's cached code version."""
    from flows.pipeline import record_run
    from tasks.plan import make_plan

    cfg = load_config(config)
    with pytest.MonkeyPatch.context() as patch:
        if fresh:
            patch.setattr(layout, "code_version", layout.code_version.__wrapped__)
        plan = make_plan(cfg)
    record_run(cfg, plan, stages, [], 0.0, orchestrator="none")
    return plan


def reader_counts(store: Path) -> dict[str, int]:
    """Rows per artifact view (and per layer of train_metrics), read through the read-only SQL entry point."""
    names = catalog.view_sources(store)
    counts = {v: catalog.query(store, f"select count(*) from {v}")[1][0][0] for v in ARTIFACT_VIEWS if v in names}
    if "train_metrics" in names:
        rows = catalog.query(store, "select layer, count(*) from train_metrics group by layer")[1]
        counts.update({f"train_metrics[{layer}]": n for layer, n in rows})
    return counts


def assert_readers_see_whole_artifacts(store: Path, reference: dict[str, int]) -> dict[str, int]:
    """Every view DuckDB offers right now reads exactly the rows of the finished reference artifact."""
    counts = reader_counts(store)
    for view, n in counts.items():
        assert n == reference[view], f"view {view}: {n} rows after the kill, {reference[view]} when complete"
    return counts


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
         "storage.training:save_file", 2, "torn"),
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


def _check(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except AssertionError as err:
        return str(err)
    except Exception as err:  # a reader that fails to read is a failure too
        return f"{type(err).__name__}: {err}"
    return None


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
            partial = _check(assert_nothing_partial, store)
            counts: dict[str, int] = {}
            reader = _check(_read_into, counts, store, reference_counts)
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


# ---------------------------------------------------------------- a kill while --force replaces an artifact


def debris(store: Path) -> list[str]:
    """What killed writers left: temp dirs and hidden temp files, scratch dirs, displaced artifacts."""
    names = (p for p in store.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial") or ".old-" in p.name)
    return sorted(str(p.relative_to(store)) for p in names)


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
        partial = _check(assert_nothing_partial, store)
        reader = _check(assert_readers_see_whole_artifacts, store, reference_counts)
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


# ---------------------------------------------------------------- the real CLI, with Prefect


@pytest.mark.prefect
def test_cli_killed_mid_training_reruns_to_the_same_artifacts(
    reference: Reference, reference_counts: dict[str, int], prefect_api: dict[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = reference.config_for(store)
    seed_run_record(config, ["tokens"], fresh=True)
    env = {**os.environ, **prefect_api, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flows.cli", "run", str(config)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            while proc.poll() is None and not any(store.glob("train/*.partial/checkpoint.safetensors")):
                time.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already when it finished before the checkpoint
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and anything it started
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert_nothing_partial(store)
    counts = assert_readers_see_whole_artifacts(store, reference_counts)
    assert "tokens" in counts and "feature_stats" not in counts

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    status = {r[0]: r[1] for r in rows if len(r) >= 4 and r[1] in ("ran", "cached")}
    assert status.get("activations") == "cached" and status.get("train[0]") == "ran", done.stdout
    latest = json.loads((store / "runs" / "latest.json").read_text())
    assert_same_run(store, latest["plan"], reference)
    assert reader_counts(store) == reference_counts


if __name__ == "__main__":
    serve()

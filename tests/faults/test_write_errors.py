"""Injected write errors and a NaN in training, in process (the writers are monkeypatched).

A full disk (OSError ENOSPC) in any stage's writer: the stage fails with a one-line UserError (what the CLI
prints), no artifact or temp directory is left visible, nothing outside the stage changes, and a rerun
completes to the uninterrupted run's artifact. A NaN in the activation cache: training stops with a clear
error, keeps its last good checkpoint, and once the cache is repaired resumes to the reference weights.
"""

from __future__ import annotations

import errno
import importlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.config import Config, load_config
from core.errors import UserError
from storage import layout
from tests.faults.conftest import (
    Reference,
    assert_nothing_partial,
    assert_same_artifact,
    diff,
    run_stages,
    snapshot,
    stage_dirs,
)

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@dataclass(frozen=True)
class Fault:
    """`target` ("module:attr" or "module:Class.method") raises ENOSPC at its `call`-th call. `torn`: the call
    first writes its file (the second argument) and the file is cut in half, as a disk filling up mid-write."""

    id: str
    stage: str
    target: str
    call: int
    torn: bool
    labels: tuple[str, ...]
    """The artifacts (conftest.stage_dirs labels) the stage writes."""
    xfail: str | None = None


FAULTS = [
    Fault("tokens-vocab", "tokens", "pyarrow.parquet:write_table", 2, True, ("tokens_train", "tokens_mine")),
    Fault("activations-reserve", "activations", "os:posix_fallocate", 5, False, ("activations",)),
    Fault("activations-pwrite", "activations", "storage.shards:_write_at", 7, False, ("activations",)),
    Fault("train-checkpoint", "train", "storage.training:save_tensors", 3, True, ("train_0", "train_1")),
    Fault("train-weights", "train", "storage.formats.base:save_tensors", 1, True, ("train_0", "train_1")),
    Fault("mine-feature-acts", "mine", "pyarrow.parquet:write_table", 1, True, ("mine",)),
    Fault("mine-stats", "mine", "storage.tables:TableSink.write", 1, False, ("mine",)),
    Fault("trace-edges", "trace", "pyarrow.parquet:write_table", 2, True, ("trace",)),
]


def inject(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> list[int]:
    """Install the fault; returns a one-item list counting the calls seen."""
    module, attr = fault.target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    seen = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        if seen[0] != fault.call:
            return real(*args, **kwargs)
        if fault.torn:
            real(*args, **kwargs)
            path = Path(args[1])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(ENOSPC.errno, ENOSPC.strerror)

    monkeypatch.setattr(owner, name, failing)
    return seen


def store_without(reference: Reference, base: Path, *stages: str) -> tuple[Config, Path]:
    """A copy of the finished reference store without the given stages' folders; its config."""
    store = base / "store"

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(folder) == reference.store and n in stages]

    shutil.copytree(reference.store, store, ignore=skip)
    return load_config(reference.config_for(store)), store


def _folders(fault: Fault) -> tuple[str, ...]:
    """The store folders a stage writes (train also writes the joint evaluation)."""
    return (fault.stage, "evaluate") if fault.stage == "train" else (fault.stage,)


@dataclass
class Failure:
    fault: Fault
    store: Path
    error: BaseException
    partial: str | None
    """assert_nothing_partial's complaint right after the failure (None: nothing partial visible)."""
    visible: list[str]
    """Artifacts of the stage visible after the failure."""
    temp: list[str]
    """Temp dirs and hidden temp files left in the store."""
    outside: list[str]
    """Changes outside the failed stage's folders."""
    rerun: str | None
    """Why the rerun did not complete to the reference artifacts (None: it did)."""


def _check(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _rerun_equals_reference(cfg: Config, store: Path, reference: Reference, fault: Fault) -> None:
    run_stages(cfg, reference.plan, (fault.stage,))
    for label in fault.labels:
        assert_same_artifact(
            stage_dirs(store, reference.plan)[label], stage_dirs(reference.store, reference.plan)[label]
        )


@pytest.fixture(scope="module")
def failure(request: pytest.FixtureRequest, reference: Reference, tmp_path_factory) -> Failure:
    """One stage run with its fault (from a store holding every other stage), what it left, then a clean rerun."""
    fault: Fault = request.param
    cfg, store = store_without(reference, tmp_path_factory.mktemp(fault.id), *_folders(fault))
    before = snapshot(store)
    with pytest.MonkeyPatch.context() as patch:
        seen = inject(patch, fault)
        try:
            run_stages(cfg, reference.plan, (fault.stage,))
            raise AssertionError(f"the stage completed although {fault.target} failed")
        except Exception as exc:
            error = exc
    assert seen[0] >= fault.call, f"{fault.target} was called {seen[0]} times: the fault never fired"
    dirs = stage_dirs(store, reference.plan)
    temp = [str(p.relative_to(store)) for p in store.rglob("*") if ".tmp-" in p.name]
    changes = [c for c in diff(before, snapshot(store)) if c[1:] != "."]
    return Failure(
        fault=fault,
        store=store,
        error=error,
        partial=_check(assert_nothing_partial, store),
        visible=[label for label in fault.labels if dirs[label].exists()],
        temp=temp,
        outside=[c for c in changes if not c[1:].startswith(_folders(fault))],
        rerun=_check(_rerun_equals_reference, cfg, store, reference, fault),
    )


def _params(xfail: bool) -> list:
    def marks(f: Fault) -> list:
        return [pytest.mark.xfail(strict=True, reason=f.xfail)] if xfail and f.xfail else []

    return [pytest.param(f, id=f.id, marks=marks(f)) for f in FAULTS]


@pytest.mark.parametrize("failure", _params(xfail=False), indirect=True)
def test_write_error_leaves_nothing_partial_and_a_rerun_completes(failure: Failure) -> None:
    assert failure.partial is None, failure.partial
    assert not failure.visible, f"visible after the failure: {failure.visible}"
    assert not failure.temp, f"temp dirs or files left: {failure.temp}"
    assert not failure.outside, f"the failed stage changed other parts of the store: {failure.outside}"
    assert failure.rerun is None, failure.rerun


@pytest.mark.parametrize("failure", _params(xfail=True), indirect=True)
def test_write_error_is_one_line_naming_the_full_disk(failure: Failure) -> None:
    """What the CLI prints: a UserError is one line; anything else is a traceback."""
    message = str(failure.error)
    assert isinstance(failure.error, UserError), f"{type(failure.error).__name__} is not a UserError: {message}"
    assert "\n" not in message and "No space left on device" in message, message


# ---------------------------------------------------------------- a NaN in the activation cache


class ReadLog:
    """A pair source that records which token ranges are read."""

    def __init__(self, source: Any) -> None:
        self.source, self.reads = source, []
        self.n_tokens = source.n_tokens

    def read(self, start: int, stop: int) -> Any:
        self.reads.append((start, stop))
        return self.source.read(start, stop)


def pick_poisoned_token(cfg: Config, acts: Path, layer: int) -> int:
    """A training token outside the pairs sampled to initialise the biases (so the first steps are clean)."""
    from core.train import sample_pairs
    from storage.shards import ActivationCache
    from tasks.evaluate import split_rows

    source = ActivationCache(acts).layer(layer)
    split = split_rows(source.n_tokens, source.tokens_per_row, cfg.train.eval_fraction)
    log = ReadLog(source)
    sample_pairs(log, cfg.train.init_tokens, torch.Generator().manual_seed(cfg.train.seed), split.train_stop)
    sampled = {t for start, stop in log.reads for t in range(start, stop)}
    return next(t for t in range(split.train_stop // 2, split.train_stop) if t not in sampled)


def poison(acts: Path, layer: int, token: int) -> tuple[Path, bytes]:
    """Set mlp_in of one cached token to NaN in its shard file; returns the file and its original bytes."""
    files = sorted((acts / f"layer={layer}").glob("pairs-*.safetensors"))
    for file in files:
        tensors = load_file(str(file))
        n = tensors["mlp_in"].shape[0]
        if token < n:
            original = file.read_bytes()
            tensors["mlp_in"][token] = float("nan")
            save_file(tensors, str(file))
            return file, original
        token -= n
    raise AssertionError("token beyond the cache")


@pytest.fixture(scope="module")
def diverged(reference: Reference, tmp_path_factory) -> dict[str, Any]:
    """Layer 0 trained on a cache with one NaN input: the error, the scratch checkpoint, then a rerun after
    the shard is restored."""
    from tasks.train import CHECKPOINT, train_transcoder

    cfg, store = store_without(reference, tmp_path_factory.mktemp("nan"), "train", "evaluate")
    plan = reference.plan
    acts = stage_dirs(store, plan)["activations"]
    token = pick_poisoned_token(cfg, acts, 0)
    file, original = poison(acts, 0, token)
    with pytest.raises(UserError) as err:
        train_transcoder.fn(cfg, plan.train[0], 0, plan.activations, plan.tokens_train)
    scratch = layout.stage_dir(store, "train", plan.train[0]).with_name(f"{plan.train[0]}.partial")
    with safe_open(str(scratch / CHECKPOINT), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        finite = all(bool(torch.isfinite(fh.get_tensor(k)).all()) for k in fh.keys())  # noqa: SIM118
    visible = stage_dirs(store, plan)["train_0"].exists()
    leftovers = [p.name for p in (store / "train").iterdir() if ".tmp-" in p.name]
    file.write_bytes(original)  # the cache repaired
    resumed = train_transcoder.fn(cfg, plan.train[0], 0, plan.activations, plan.tokens_train)
    return {"error": err.value, "meta": meta, "finite": finite, "visible": visible, "leftovers": leftovers,
            "resumed": resumed, "store": store, "token": token, "file": file}  # fmt: skip


def test_nan_in_the_cache_stops_training_and_keeps_the_last_good_checkpoint(diverged: dict[str, Any]) -> None:
    message = str(diverged["error"])
    assert "\n" not in message and message.startswith("layer 0: training diverged"), message
    step = int(message.split("by step ")[1].split(",")[0])
    assert step >= 2, f"diverged at step {step}: the poisoned token {diverged['token']} was met at once"
    assert diverged["meta"]["step"] == step - 1, "the checkpoint is not the last step before the NaN"
    assert diverged["finite"], "the kept checkpoint holds non-finite tensors"
    assert not diverged["visible"] and not diverged["leftovers"], "a diverged run left an artifact or temp dir"


def test_training_resumes_from_the_good_checkpoint_to_the_reference(diverged: dict[str, Any], reference) -> None:
    """The checkpoint before the NaN lies on the uninterrupted trajectory: resuming gives the same weights."""
    assert diverged["resumed"]["status"] == "ran"
    label = "train_0"
    assert_same_artifact(
        stage_dirs(diverged["store"], reference.plan)[label], stage_dirs(reference.store, reference.plan)[label]
    )


def test_nan_in_the_cache_is_blamed_on_the_data(diverged: dict[str, Any]) -> None:
    """The message names the poisoned shard (and its tensor) and how to rebuild the cache, not the lr."""
    message = str(diverged["error"])
    assert "activation" in message and "lr" not in message, message
    file = diverged["file"]
    assert f"{file.parent.name}/{file.name} (mlp_in)" in message and "--force activations" in message, message

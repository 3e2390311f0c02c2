"""Shared by the fault suite: a tiny corpus and config, one uninterrupted reference run, the real CLI in a
subprocess (with a spy that records model loads), store snapshots, the "nothing partial is visible" check
and exact artifact comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open

from core.config import Config, load_config
from storage import layout
from tasks.plan import STAGES, Plan, make_plan
from tests import corpora

REPO = Path(__file__).resolve().parents[2]
ROOT_PROMPT = "The cat sat on the mat."
NOT_STAGES = {"runs", layout.MANIFEST}
"""Top-level store entries that are not stage folders (Prefect's results folder is hidden, so skipped)."""


# ---------------------------------------------------------------- the tiny experiment


def write_corpus(folder: Path, n_docs: int = 60) -> Path:
    """Text files of varied length, each naming its document number."""
    return corpora.write_corpus(folder, n_docs)


def tiny_config(corpus: Path, store: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Two layers of `tiny:ln`; 40 training rows of 32 tokens = 5 shards of 8 rows; 2 epochs of 10 steps
    with a checkpoint every step; one trace root. `sections` update single keys of a section."""
    cfg: dict[str, Any] = {
        "model": {"name": "tiny:ln", "device": "cpu"},
        "corpus": {"source": str(corpus), "min_chars": 100},
        "tokens": {"context_size": 32, "train_rows": 40, "mine_rows": 8, "holdout_fraction": 0.2},
        "activations": {"layers": [0, 1], "shard_tokens": 248, "batch_rows": 4},
        "train": {"expansion_factor": 2, "batch_size": 128, "epochs": 2, "checkpoint_every": 1, "lr": 3e-3,
                  "eval_ce_rows": 2, "init_tokens": 256, "resample_tokens": 256},
        "mine": {"top_k": 5, "num_bands": 2, "per_band": 1, "dashboard_pages": 2},
        "trace": {"roots": [{"prompt": ROOT_PROMPT, "layer": 1, "feature": 3}], "num_branches": 3,
                  "max_features": 64},
        "feature_inputs": {"top": 2, "layers": [1], "roots": True, "max_contexts": 16},
        "store": {"root": str(store)},
        "runner": {"max_workers": 1, "torch_threads": 1},
    }  # fmt: skip
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_stages(cfg: Config, plan: Plan, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()) -> list[dict]:
    """The pipeline's stage tasks in pipeline order, called directly (no Prefect) as flows.pipeline.execute
    calls them: tokens (train + mining split), activations, train per layer + the joint evaluation, mine, trace,
    feature_inputs."""
    from tasks.activations import cache_activations
    from tasks.evaluate import evaluate_replacement
    from tasks.feature_inputs import mean_feature_inputs
    from tasks.mine import mine_features
    from tasks.plan import replacement_key
    from tasks.tokens import tokenize_corpus
    from tasks.trace import trace_roots
    from tasks.train import train_transcoder

    out: list[dict] = []
    if "tokens" in stages:
        split = "heldout" if cfg.mine.corpus is None else "all"
        out.append(tokenize_corpus.fn(cfg, "train", plan.tokens_train, force="tokens" in force))
        out.append(tokenize_corpus.fn(cfg, split, plan.tokens_mine, force="tokens" in force))
    if "activations" in stages:
        out.append(cache_activations.fn(cfg, plan.activations, plan.tokens_train, force="activations" in force))
    if "train" in stages:
        for layer, key in sorted(plan.train.items()):
            out.append(train_transcoder.fn(cfg, key, layer, plan.activations, plan.tokens_train, "train" in force))
        key = replacement_key(cfg, plan.train)
        out.append(evaluate_replacement.fn(cfg, key, dict(plan.train), plan.tokens_train, "train" in force))
    if "mine" in stages:
        out.append(mine_features.fn(cfg, plan.mine, plan.keys(), force="mine" in force))
    if "trace" in stages:
        out.append(trace_roots.fn(cfg, plan.trace, plan.keys(), force="trace" in force))
    if "feature_inputs" in stages:
        out.append(mean_feature_inputs.fn(cfg, plan.feature_inputs, plan.keys(), force="feature_inputs" in force))
    return out


def stage_dirs(store: Path, plan: Plan | dict[str, Any]) -> dict[str, Path]:
    """Label -> final directory of every artifact of a plan (tokens_train, tokens_mine, activations, train_L,
    mine, trace)."""
    keys = plan.keys() if isinstance(plan, Plan) else plan
    dirs = {
        "tokens_train": layout.stage_dir(store, "tokens", keys["tokens_train"]),
        "tokens_mine": layout.stage_dir(store, "tokens", keys["tokens_mine"]),
        "activations": layout.stage_dir(store, "activations", keys["activations"]),
        "mine": layout.stage_dir(store, "mine", keys["mine"]),
        "trace": layout.stage_dir(store, "trace", keys["trace"]),
        "feature_inputs": layout.stage_dir(store, "feature_inputs", keys["feature_inputs"]),
    }
    dirs.update({f"train_{layer}": layout.stage_dir(store, "train", key) for layer, key in keys["train"].items()})
    return dirs


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of every stage; other stores use its corpus and config (so the same keys)."""

    base: Path
    config: Path
    cfg: Config
    plan: Plan
    store: Path

    def config_for(self, store: Path, name: str | None = None) -> Path:
        """The reference config with another store root (no key depends on the store root)."""
        data = yaml.safe_load(self.config.read_text())
        data["store"]["root"] = str(store)
        return write_config(store.parent / (name or f"{store.name}.yaml"), data)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The whole tiny pipeline run once in this process, recorded as the store's latest run (~10 s)."""
    from flows.pipeline import record_run

    base = tmp_path_factory.mktemp("faults-reference")
    corpus = write_corpus(base / "corpus")
    store = base / "store"
    config = write_config(base / "tiny.yaml", tiny_config(corpus, store))
    cfg = load_config(config)
    plan = make_plan(cfg)
    summaries = run_stages(cfg, plan)
    record_run(cfg, plan, list(STAGES), summaries, 0.0, orchestrator="none")
    return Reference(base, config, cfg, plan, store)


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> dict[str, str]:
    """Environment that points CLI subprocesses at the session's Prefect test server (no server start each)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


# ---------------------------------------------------------------- the CLI in a subprocess

MARKER_ENV = "CIRCUITFLOW_FAULTS_MARKER"
HEAVY = {"core.model": "load_model", "prefect.server.api.server": "SubprocessASGIServer.start"}
"""What counts as heavy work in a CLI process: loading a model, booting a Prefect server."""
PROBE = f"""
import importlib.util, os, sys

HEAVY = {HEAVY!r}


class _Spy:
    '''Wraps the HEAVY functions as their modules are first imported: every call is appended to a file.'''

    def find_spec(self, name, path=None, target=None):
        if name not in HEAVY:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            owner, parts = module, HEAVY[name].split(".")
            for part in parts[:-1]:
                owner = getattr(owner, part)
            real = getattr(owner, parts[-1])

            def spied(*args, **kwargs):
                with open(os.environ[{MARKER_ENV!r}], "a") as fh:
                    fh.write(name + ":" + HEAVY[name] + "\\n")
                return real(*args, **kwargs)

            setattr(owner, parts[-1], spied)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Spy())
sys.argv[0] = "circuitflow"
from flows.cli import main
sys.exit(main())
"""
"""`python -c PROBE ARGS...` is `circuitflow ARGS...` (flows.cli:main, as the console script runs it) plus the spy."""


@dataclass(frozen=True)
class Outcome:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    cpu: float
    """User + system CPU seconds of the process and the children it waited for (interpreter start included):
    load-independent, unlike wall time."""
    wall: float
    heavy: list[str]
    """HEAVY calls made, in order (`module:function`)."""


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> Outcome:
    """Run `circuitflow ARGS` in a fresh interpreter; its CPU time comes from wait4's resource usage."""
    with tempfile.TemporaryDirectory() as scratch:
        marker = Path(scratch) / "heavy"
        full_env = {**os.environ, MARKER_ENV: str(marker), "OMP_NUM_THREADS": "1", **(env or {})}
        with open(Path(scratch) / "out", "w+") as out, open(Path(scratch) / "err", "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-c", PROBE, *args],
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                watchdog.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        heavy = marker.read_text().splitlines() if marker.exists() else []
    return Outcome(tuple(args), proc.returncode, stdout, stderr, usage.ru_utime + usage.ru_stime, wall, heavy)


# ---------------------------------------------------------------- the store, seen from outside


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `root`, hidden ones too: relative path -> (kind, size, mtime ns)."""
    if not root.exists():
        return {}
    out = {".": ("dir", 0, root.stat().st_mtime_ns)}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(folder) / name
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[str(path.relative_to(root))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What changed between two snapshots, one entry per path."""
    added = [f"+{p}" for p in sorted(set(after) - set(before))]
    removed = [f"-{p}" for p in sorted(set(before) - set(after))]
    changed = [f"~{p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return added + removed + changed


def visible_artifacts(store: Path) -> list[Path]:
    """Every `<stage>/<key>/` directory a reader would open: names without a dot (not `.tmp-*`, `.partial`, `.old-*`)."""
    if not store.is_dir():
        return []
    stages = [p for p in store.iterdir() if p.is_dir() and p.name not in NOT_STAGES and not p.name.startswith(".")]
    return sorted(child for stage in stages for child in stage.iterdir() if child.is_dir() and "." not in child.name)


def assert_nothing_partial(store: Path) -> int:
    """Every visible artifact has its manifest, the files its manifest lists, and reads whole (every Parquet
    table and safetensors tensor). Returns how many artifacts were checked."""
    found = visible_artifacts(store)
    for folder in found:
        manifest = folder / layout.MANIFEST
        assert manifest.is_file(), f"{folder} is visible without {layout.MANIFEST}"
        listed = json.loads(manifest.read_text()).get("files", [])
        for name in listed if isinstance(listed, list) else []:
            assert (folder / name).is_file(), f"{folder}: manifest lists {name}, which is missing"
        for path, _ in artifact_files(folder).values():
            read_artifact(path)
    return len(found)


def artifact_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Relative path -> (path, kind) of the Parquet and safetensors files of an artifact (not hidden temp files)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.suffix in (".parquet", ".safetensors"):
            out[str(path.relative_to(folder))] = (path, path.suffix[1:])
    return out


def read_artifact(path: Path) -> Any:
    """A Parquet file as a table, a safetensors file as {name: tensor}; raises when the file is torn."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).read()  # the file alone: no hive columns from the path
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__


def assert_same_artifact(got: Path, want: Path) -> None:
    """The same Parquet tables (exact, schema included) and safetensors tensors (bit-equal), and the same
    eval.json up to timings."""
    got_files, want_files = artifact_files(got), artifact_files(want)
    assert sorted(got_files) == sorted(want_files), f"{got}: files differ from {want}"
    for rel, (path, kind) in want_files.items():
        a, b = read_artifact(got_files[rel][0]), read_artifact(path)
        if kind == "parquet":
            assert a.equals(b), f"{got / rel} differs from the uninterrupted run"
        else:
            assert sorted(a) == sorted(b), f"{got / rel}: tensor names differ"
            for name in b:
                assert torch.equal(a[name], b[name]), f"{got / rel}: tensor {name} differs from the uninterrupted run"
    if (want / "eval.json").is_file():
        assert _untimed(got / "eval.json") == _untimed(want / "eval.json"), f"{got}/eval.json differs"


def _untimed(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}


def assert_same_run(store: Path, plan: Plan | dict[str, Any], reference: Reference) -> None:
    """Every artifact of `plan` in `store` equals the reference run's."""
    got, want = stage_dirs(store, plan), stage_dirs(reference.store, reference.plan)
    assert sorted(got) == sorted(want)
    for label, folder in want.items():
        assert layout.is_complete(got[label]), f"{label}: {got[label]} is not complete"
        assert_same_artifact(got[label], folder)

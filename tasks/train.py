"""Stage `train`: one transcoder per layer from the cached activation pairs, resumable, evaluated on
held-out token rows (FVU, L0, spliced cross-entropy), written as a SAELens-layout folder plus
metrics.parquet, eval.json / eval.md and training_curve.png; one Prefect task per layer."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.context import FlowRunContext, TaskRunContext
from safetensors import safe_open
from safetensors.torch import save_file

from core.batches import ShuffledPairs
from core.config import Config
from core.metrics import PairEval, SpliceEval, density_histogram, evaluate_pairs, log10_density, splice_eval
from core.model import load_model, resolve_device
from core.train import (
    TrainingDivergedError,
    TrainState,
    check_finite,
    fit,
    new_transcoder,
    restore_state,
    state_meta,
    state_tensors,
    transcoder_config,
)
from core.transcoder import Transcoder
from storage import layout
from storage.checkpoints import SAE_SPARSITY, load_transcoder, save_sparsity, save_transcoder
from storage.shards import ActivationCache, PairSource
from storage.tables import read_tokens, write_table
from tasks.common import build_stage, cache_key, log
from tasks.locking import serialized
from tasks.plan import EVAL_STAGE, replacement_key
from tasks.train_progress import TrainProgress

STAGE = "train"
CHECKPOINT = "checkpoint.safetensors"
"""Resumable training state in the scratch dir: tensors plus JSON position/history in the header."""
METRICS = "metrics.parquet"
EVAL_JSON, EVAL_MD, CURVE = "eval.json", "eval.md", "training_curve.png"
RESULTS_DIR = ".prefect-results"
"""Mirrors flows.pipeline.RESULTS_DIR (tasks never import flows): Prefect results live in the store."""
METRIC_COLUMNS = ("loss", "mse", "sparsity", "aux", "l0", "fvu", "dead", "lr")
_PLOT_LOCK = threading.Lock()
"""matplotlib's text layout is not thread-safe; layer tasks may plot concurrently in one process."""


class Split(NamedTuple):
    """Training tokens [0, train_stop) and held-out tokens [train_stop, n_tokens), in whole rows."""

    n_rows: int
    eval_rows: int
    train_stop: int


def split_rows(n_tokens: int, tokens_per_row: int, eval_fraction: float) -> Split:
    """Hold out the last `eval_fraction` of the token rows (at least one) for evaluation."""
    n_rows = n_tokens // tokens_per_row
    eval_rows = max(1, round(n_rows * eval_fraction))
    if eval_rows >= n_rows:
        raise layout.StoreError(
            f"train.eval_fraction {eval_fraction} holds out all {n_rows} cached token rows; lower it or cache more rows "
            "(tokens.train_rows)"
        )
    return Split(n_rows, eval_rows, (n_rows - eval_rows) * tokens_per_row)


# ---------------------------------------------------------------- resumable checkpoints


def save_checkpoint(state: TrainState, path: Path, key: str) -> None:
    """Write the training state atomically (never a pickle): tensors + JSON meta in one safetensors file."""
    check_finite(state)  # a diverged state never replaces the last good checkpoint
    meta = json.dumps({"key": key, **state_meta(state)})
    with layout.atomic_file(path) as tmp:
        save_file(state_tensors(state), str(tmp), metadata={"meta": meta})


def load_checkpoint(path: Path, tc: Transcoder, cfg: Config, key: str) -> TrainState | None:
    """The saved state of this stage key, loaded into `tc`, or None when there is none (or a foreign one)."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if meta.get("key") != key:
        log(f"train: ignoring {path}: it belongs to stage key {meta.get('key')}, not {key}")
        return None
    return restore_state(tc, cfg.train, tensors, meta)


class Checkpointer:
    """fit callback: a checkpoint every `every` steps and a progress line every ~10% of the steps."""

    def __init__(self, path: Path, key: str, every: int, total: int, label: str) -> None:
        self.path, self.key, self.every, self.total, self.label = path, key, every, total, label
        self.start: tuple[float, int] | None = None  # (time, tokens) at the first step of this session
        self.next_log = 0

    def __call__(self, state: TrainState, row: dict[str, float] | None) -> None:
        if self.start is None:
            self.start = (time.perf_counter(), state.tokens)
        if state.step % self.every == 0:
            self.save(state)
        if row is not None and state.step >= self.next_log:
            self.next_log = state.step + max(1, self.total // 10)
            rate = (state.tokens - self.start[1]) / max(time.perf_counter() - self.start[0], 1e-9)
            log(
                f"{self.label}: step {state.step}/{self.total} fvu {row['fvu']:.3f} l0 {row['l0']:.1f} "
                f"dead {row['dead']:.3f} lr {row['lr']:.2e} ({rate:,.0f} tok/s)"
            )

    def save(self, state: TrainState) -> None:
        save_checkpoint(state, self.path, self.key)


# ---------------------------------------------------------------- the stage


def train_layer(cfg: Config, key: str, layer: int, source: PairSource, scratch: Path, split: Split) -> TrainState:
    """Train (or resume training) one layer's transcoder; returns the final state."""
    tc_cfg = transcoder_config(
        cfg.train, source.d_in, source.d_out, source.hook_in, source.hook_out, layer, cfg.model.name
    )
    tc = new_transcoder(cfg.train, tc_cfg).to(resolve_device(cfg.model.device))
    state = load_checkpoint(scratch / CHECKPOINT, tc, cfg, key)
    if state is not None:
        log(f"train[{layer}]: resuming from step {state.step} (epoch {state.epoch}, batch {state.batch})")
    batches = ShuffledPairs(source)
    total = batches.num_batches(cfg.train.batch_size, split.train_stop) * cfg.train.epochs
    saver = Checkpointer(scratch / CHECKPOINT, key, cfg.train.checkpoint_every, total, f"train[{layer}]")
    try:
        state = fit(
            tc, batches, cfg.train, [saver, TrainProgress(layer, total)], stop_token=split.train_stop, state=state
        )
    except TrainingDivergedError as err:
        raise TrainingDivergedError(f"layer {layer}: {err} (checkpoint: {scratch / CHECKPOINT})") from None
    saver.save(state)  # a kill during evaluation does not repeat training
    return state


def evaluate_layer(
    cfg: Config, tc: Transcoder, source: PairSource, split: Split, tokens_key: str
) -> tuple[dict[str, Any], torch.Tensor]:
    """FVU, L0 and densities on the held-out pairs; clean/spliced/zero-ablated CE on held-out rows.

    Returns the summary and the log10 firing density per feature [d_sae]."""
    pairs = evaluate_pairs(tc, source, split.train_stop, source.n_tokens, cfg.train.kind, cfg.train.batch_size)
    ce = None
    n_ce = min(cfg.train.eval_ce_rows, split.eval_rows)
    if n_ce > 0:
        rows = read_tokens(layout.stage_dir(cfg.store.root, "tokens", tokens_key) / "tokens.parquet")
        if rows.shape[0] != split.n_rows:
            raise layout.StoreError(
                f"tokens {tokens_key} has {rows.shape[0]} rows but the activation cache has {split.n_rows}; rerun with --force activations"
            )
        model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
        held_out = torch.from_numpy(rows[split.n_rows - split.eval_rows :][:n_ce].astype(np.int64))
        first_pos = rows.shape[1] - source.tokens_per_row  # 1 when BOS was dropped from training
        ce = splice_eval(model, held_out, {tc.cfg.layer: tc}, cfg.activations.batch_rows, first_pos)
    return eval_summary(pairs, ce, n_ce), torch.from_numpy(log10_density(pairs.density)).float()


def eval_summary(pairs: PairEval, ce: SpliceEval | None, ce_rows: int) -> dict[str, Any]:
    counts, edges = density_histogram(pairs.density)
    out: dict[str, Any] = {
        "eval_tokens": pairs.n_tokens, "fvu": pairs.fvu, "mse": pairs.mse, "l0": pairs.l0,
        "dead_fraction": pairs.dead_fraction, "dense_fraction": pairs.dense_fraction,
        "live_fraction": pairs.live_fraction,
        "log10_density_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }  # fmt: skip
    if ce is not None:
        out.update({f"ce_{k}" if not k.startswith("ce_") else k: v for k, v in ce._asdict().items()})
        out["ce_rows"] = ce_rows
    return out


def build_train(cfg: Config, key: str, layer: int, activations_key: str, tokens_key: str, tmp: Path) -> dict[str, Any]:
    """Train, evaluate and write one layer's transcoder folder into `tmp`; return the manifest fields."""
    acts = layout.stage_dir(cfg.store.root, "activations", activations_key)
    if not layout.is_complete(acts):
        raise layout.StoreError(f"{acts}: activations {activations_key} are missing; run the activations stage first")
    source = ActivationCache(acts).layer(layer)
    split = split_rows(source.n_tokens, source.tokens_per_row, cfg.train.eval_fraction)
    scratch = layout.scratch_dir(cfg.store.root, STAGE, key)
    start = time.perf_counter()
    state = train_layer(cfg, key, layer, source, scratch, split)
    train_seconds = time.perf_counter() - start
    tc = state.transcoder.eval()
    log(f"train[{layer}]: evaluating on {split.eval_rows} held-out rows")
    evaluation, log_density = evaluate_layer(cfg, tc, source, split, tokens_key)
    summary = {"layer": layer, **evaluation}
    summary.update(train_seconds=round(train_seconds, 3), steps=state.step, train_tokens=state.tokens)
    write_outputs(tc.cpu(), state, summary, log_density, tmp)
    return {
        "layer": layer, "kind": cfg.train.kind, "activation": cfg.train.activation,
        "d_in": tc.cfg.d_in, "d_sae": tc.cfg.d_sae, "d_out": tc.cfg.d_out,
        "hook_in": tc.cfg.hook_in, "hook_out": tc.cfg.hook_out, "activations": activations_key,
        "train_rows": split.n_rows - split.eval_rows, "eval_rows": split.eval_rows,
        "files": ["cfg.json", "sae_weights.safetensors", SAE_SPARSITY, METRICS, EVAL_JSON, EVAL_MD, CURVE],
        "eval": {k: v for k, v in summary.items() if k != "log10_density_histogram"},
    }  # fmt: skip


def write_outputs(
    tc: Transcoder, state: TrainState, summary: dict[str, Any], log_density: torch.Tensor, out: Path
) -> None:
    """The native transcoder folder (+ SAELens' sparsity file), metrics, eval report and curves."""
    save_transcoder(tc, out)
    save_sparsity(out, log_density)
    write_table(metrics_table(state.history), out / METRICS)
    layout.write_json_atomic(out / EVAL_JSON, summary)
    (out / EVAL_MD).write_text(eval_markdown(summary))
    plot_curves(state.history, out / CURVE, f"layer {summary['layer']}")


def metrics_table(history: list[dict[str, float]]) -> pa.Table:
    """Logged rows -> (step int64, tokens int64, loss, mse, sparsity, aux, l0, fvu, dead, lr float64)."""
    columns = {
        "step": pa.array([int(r["step"]) for r in history], pa.int64()),
        "tokens": pa.array([int(r["tokens"]) for r in history], pa.int64()),
    }
    columns.update({name: pa.array([float(r[name]) for r in history], pa.float64()) for name in METRIC_COLUMNS})
    return pa.table(columns)


def eval_markdown(summary: dict[str, Any]) -> str:
    """The eval summary as a small markdown report."""
    names = [
        ("ce_recovered", "CE recovered"), ("fvu", "FVU (held out)"), ("l0", "L0"), ("ce_clean", "CE clean"),
        ("ce_spliced", "CE spliced"), ("ce_zero", "CE zero-ablated"), ("ce_kl", "KL(clean||spliced)"),
        ("dead_fraction", "dead fraction"), ("dense_fraction", "dense fraction"), ("train_seconds", "train seconds"),
        ("train_tokens", "train tokens"), ("eval_tokens", "eval tokens"),
    ]  # fmt: skip
    lines = [f"## Transcoder, layer {summary['layer']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(summary[k])} |" for k, label in names if k in summary]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Training curves (loss, FVU, L0, dead fraction, sparsity, lr against tokens) as a PNG."""
    with _PLOT_LOCK:
        _plot_curves(history, path, title)


def _plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    tokens = [r["tokens"] for r in history]
    for i, name in enumerate(("loss", "fvu", "l0", "dead", "sparsity", "lr")):
        ax = fig.add_subplot(2, 3, i + 1)
        ax.plot(tokens, [r[name] for r in history], linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("tokens")
        if name in ("loss", "fvu") and all(r[name] > 0 for r in history):
            ax.set_yscale("log")
    fig.suptitle(f"Transcoder training, {title}")
    fig.tight_layout()
    with layout.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


# ---------------------------------------------------------------- Prefect


@task(name="train_transcoder", task_run_name="train-layer-{layer}", cache_key_fn=cache_key(STAGE), persist_result=True)
def train_transcoder(
    cfg: Config, key: str, layer: int, activations_key: str, tokens_key: str, force: bool = False
) -> dict[str, Any]:
    """Prefect task: the train stage of one layer (resumes from its scratch checkpoint after a kill)."""
    summary = build_stage(
        cfg.store.root, STAGE, key, lambda tmp: build_train(cfg, key, layer, activations_key, tokens_key, tmp), force
    )
    if summary["status"] == "ran":
        _remove_scratch(cfg, key)
    publish_artifacts(summary, layer)
    return {**summary, "layer": layer}


def _remove_scratch(cfg: Config, key: str) -> None:
    scratch = layout.stage_dir(cfg.store.root, STAGE, key).with_name(f"{key}.partial")
    (scratch / CHECKPOINT).unlink(missing_ok=True)
    if scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()


def publish_artifacts(summary: dict[str, Any], layer: int) -> None:
    """A table artifact of the final metrics and a markdown report (inside a Prefect run only)."""
    if TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    ev = summary["manifest"]["eval"]
    table = [{"metric": k, "value": v} for k, v in ev.items() if isinstance(v, (int, float))]
    kind = summary["manifest"].get("kind", "transcoder")
    create_table_artifact(  # one key per layer: the versions list every dictionary trained at it (sweep points too)
        key=f"train-layer-{layer}",
        table=table,
        description=f"{kind} layer {layer}, key {summary['key']}: final metrics",
    )
    report = (Path(summary["path"]) / EVAL_MD).read_text()
    create_markdown_artifact(key=f"train-report-layer-{layer}", markdown=report + f"\nFolder: `{summary['path']}`\n")


class TrainJob(NamedTuple):
    """One train task: the config whose train section is trained, its train stage key and layer."""

    cfg: Config
    key: str
    layer: int
    name: str | None = None
    """Task run name in the Prefect UI (None: train-layer-<layer>)."""


def run_train_tasks(jobs: list[TrainJob], params: dict[str, str], forced: bool, run_task: Any) -> list[dict[str, Any]]:
    """One train task per job (`params`: activations_key, tokens_key), submitted concurrently inside a
    flow run (the jobs are independent; outside a flow run they run one after another through
    `run_task`). Returns their summaries in job order; raises the first failed job's error."""
    if FlowRunContext.get() is None:
        return [run_task(train_transcoder, j.cfg, STAGE, j.key, forced, layer=j.layer, **params) for j in jobs]
    futures = [
        _configured(j.cfg, j.key, forced, j.name).submit(cfg=j.cfg, key=j.key, layer=j.layer, force=forced, **params)
        for j in jobs
    ]
    summaries = []
    for job, future in zip(jobs, futures, strict=True):
        future.wait()
        summaries.append(_summarize(future.state, job.cfg, job.key, job.layer))
    return summaries


def train_layers(cfg: Config, plan: Any, forced: bool, run_task: Any) -> list[dict[str, Any]]:
    """One train task per configured layer, submitted concurrently inside a flow run (independent
    layers; outside a flow run they run one after another through `run_task`), then, with several
    layers, the evaluation with every layer's transcoder spliced in at once."""
    params = {"activations_key": plan.activations, "tokens_key": plan.tokens_train}
    layers = sorted(plan.train.items())
    summaries = run_train_tasks([TrainJob(cfg, key, layer) for layer, key in layers], params, forced, run_task)
    if len(layers) > 1 and cfg.train.eval_ce_rows > 0:
        key = replacement_key(cfg, plan.train)
        summaries.append(
            run_task(evaluate_replacement, cfg, EVAL_STAGE, key, forced, train_keys=dict(layers),
                     tokens_key=plan.tokens_train)
        )  # fmt: skip
    return summaries


# ---------------------------------------------------------------- every layer replaced at once


def build_replacement_eval(cfg: Config, train_keys: dict[int, str], tokens_key: str, tmp: Path) -> dict[str, Any]:
    """CE clean / all transcoders spliced / all MLPs zero-ablated on the held-out rows of the train split."""
    rows = read_tokens(layout.stage_dir(cfg.store.root, "tokens", tokens_key) / "tokens.parquet")
    first_pos = 1 if cfg.activations.drop_bos else 0
    split = split_rows(rows.shape[0] * (rows.shape[1] - first_pos), rows.shape[1] - first_pos, cfg.train.eval_fraction)
    n_ce = min(cfg.train.eval_ce_rows, split.eval_rows)
    device = resolve_device(cfg.model.device)
    tcs = {
        int(layer): load_transcoder(layout.stage_dir(cfg.store.root, STAGE, key), device)
        for layer, key in train_keys.items()
    }
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    held_out = torch.from_numpy(rows[split.n_rows - split.eval_rows :][:n_ce].astype(np.int64))
    ce = splice_eval(model, held_out, tcs, cfg.activations.batch_rows, first_pos)
    summary = {
        "layers": sorted(tcs),
        "ce_rows": n_ce,
        **{k if k.startswith("ce_") else f"ce_{k}": v for k, v in ce._asdict().items()},
    }
    layout.write_json_atomic(tmp / EVAL_JSON, summary)
    lines = [
        f"## Every MLP of layers {sorted(tcs)} replaced by its transcoder at once",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if k != "layers"]
    (tmp / EVAL_MD).write_text("\n".join(lines) + "\n")
    return {"eval": summary, "train": {str(k): v for k, v in sorted(train_keys.items())}}


@task(
    name="evaluate_replacement",
    task_run_name="evaluate-all-layers",
    cache_key_fn=cache_key(EVAL_STAGE),
    persist_result=True,
)
def evaluate_replacement(
    cfg: Config, key: str, train_keys: dict[int, str], tokens_key: str, force: bool = False
) -> dict[str, Any]:
    """Prefect task: cross-entropy with every trained layer's transcoder spliced in at once."""
    summary = build_stage(
        cfg.store.root, EVAL_STAGE, key, lambda tmp: build_replacement_eval(cfg, train_keys, tokens_key, tmp), force
    )
    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        report = (Path(summary["path"]) / EVAL_MD).read_text()
        create_markdown_artifact(key="train-all-layers", markdown=report)
    return summary


def _configured(cfg: Config, key: str, forced: bool, name: str | None = None) -> Any:
    """As flows.pipeline.run_task: recompute when forced or when the artifact is missing."""
    complete = layout.is_complete(layout.stage_dir(cfg.store.root, STAGE, key))
    results = Path(cfg.store.root).resolve() / RESULTS_DIR
    results.mkdir(parents=True, exist_ok=True)
    named = {"task_run_name": name} if name else {}
    return serialized(
        train_transcoder.with_options(refresh_cache=forced or not complete, result_storage=results, **named),
        cfg.store.root,
    )


def _summarize(state: Any, cfg: Config, key: str, layer: int) -> dict[str, Any]:
    summary = dict(state.result())  # raises the task's error when it failed
    summary["path"] = str(layout.stage_dir(cfg.store.root, STAGE, key))
    summary["layer"] = layer
    if state.name == "Cached":
        summary["status"], summary["seconds"] = "cached", 0.0
    return summary

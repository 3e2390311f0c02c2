"""Stage `train`: one transcoder per layer from the cached activation pairs, resumable, evaluated on
held-out token rows (tasks.evaluate), written as a SAELens-layout folder plus metrics.parquet, eval.json /
eval.md and training_curve.png (tasks.train_report); one Prefect task per layer (fanned out by
flows.train_layers)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from prefect import task

from core.batches import ShuffledPairs
from core.config import Config
from core.model import resolve_device
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
from storage.checkpoints import SAE_SPARSITY, save_sparsity, save_transcoder
from storage.shards import ActivationCache, PairSource
from storage.tables import write_table
from storage.training import CHECKPOINT, METRICS, metrics_table, read_checkpoint, write_checkpoint
from tasks.common import build_stage, cache_key, log
from tasks.evaluate import EVAL_JSON, EVAL_MD, Split, eval_markdown, evaluate_layer, split_rows
from tasks.train_progress import TrainProgress
from tasks.train_report import plot_curves, publish_artifacts

STAGE = "train"
CURVE = "training_curve.png"


# ---------------------------------------------------------------- resumable checkpoints


def save_checkpoint(state: TrainState, path: Path, key: str) -> None:
    """Write the training state atomically (never a pickle): tensors + JSON meta in one safetensors file."""
    check_finite(state)  # a diverged state never replaces the last good checkpoint
    write_checkpoint(path, state_tensors(state), {"key": key, **state_meta(state)})


def load_checkpoint(path: Path, tc: Transcoder, cfg: Config, key: str) -> TrainState | None:
    """The saved state of this stage key, loaded into `tc`, or None when there is none (or a foreign one)."""
    found = read_checkpoint(path)
    if found is None:
        return None
    tensors, meta = found
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


# ---------------------------------------------------------------- Prefect


@task(name="train_transcoder", task_run_name="train-layer-{layer}", cache_key_fn=cache_key(STAGE), persist_result=True)
def train_transcoder(
    cfg: Config,
    key: str,
    layer: int,
    activations_key: str,
    tokens_key: str,
    force: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Prefect task: the train stage of one layer (resumes from its scratch checkpoint after a kill).
    `threads`: torch threads for this task's work (None: as set by the caller)."""
    if threads is not None:
        torch.set_num_threads(threads)
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

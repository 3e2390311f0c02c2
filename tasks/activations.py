"""Stage `activations`: run the model over the training token rows and cache every chosen layer's
(MLP input, MLP output) pairs as safetensors shards, resumable shard by shard.

Work happens in the persistent `<key>.partial/` scratch directory: each finished shard survives a
kill, a rerun continues at the next unfinished shard, and the manifest is written last on publish.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from core.activations import (
    CaptureError,
    MlpPairs,
    allocate_pairs,
    capture_rows,
    check_capture,
    hook_names,
    pair_dims,
    tokens_per_row,
)
from core.config import ActivationsConfig, Config
from core.model import load_model
from storage import layout
from storage.shards import (
    DTYPES,
    ShardWriter,
    manifest_fields,
    pending_shards,
    plan_shards,
    remove_temp_files,
)
from storage.tables import read_tokens
from tasks.common import cache_key, key_provenance, log, stage_identity, why_run

STAGE = "activations"
RESUME_FILE = "resume.json"
"""Scratch-only record of how shards are being computed, so a resume recomputes them identically."""


def load_rows(root: str | Path, tokens_key: str) -> np.ndarray:
    """The training token rows int32 [row, pos] of a finished tokens stage."""
    folder = layout.stage_dir(root, "tokens", tokens_key)
    if not layout.is_complete(folder):
        raise layout.StoreError(
            f"{folder}: tokens stage {tokens_key} is missing; run it first (circuitflow run CONFIG --stages tokens,activations)"
        )
    return read_tokens(folder / "tokens.parquet")


def layer_dims(model: HookedTransformer, acts: ActivationsConfig) -> tuple[int, int]:
    """(d_in, d_out), the same at every configured layer."""
    dims = set(pair_dims(model, acts.layers, acts.hook_in, acts.hook_out).values())
    if len(dims) != 1:
        raise CaptureError(f"activations.hook_in/hook_out have different widths across layers: {sorted(dims)}")
    return dims.pop()


def resume_batch_rows(scratch: Path, record: dict[str, Any], batch_rows: int) -> int:
    """The batch size earlier sessions used for this scratch dir (a stale scratch dir is emptied)."""
    file = scratch / RESUME_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        if {k: v for k, v in old.items() if k != "batch_rows"} == record:
            if old["batch_rows"] != batch_rows:
                log(f"activations: resuming with batch_rows={old['batch_rows']} as before, so shards stay identical")
            return int(old["batch_rows"])
        log(f"activations: {scratch} holds shards of a different plan; starting over")
        clear_dir(scratch)
    with layout.atomic_file(file) as tmp:  # no fsync: losing it in a crash only costs a fresh start
        tmp.write_text(json.dumps({**record, "batch_rows": batch_rows}))
    return batch_rows


def clear_dir(folder: Path) -> None:
    """Empty a scratch directory (keeping the directory itself)."""
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def cache_shard(
    model: HookedTransformer,
    rows: Tensor,
    writer: ShardWriter,
    ring: list[dict[int, MlpPairs]],
    batch_rows: int,
    acts: ActivationsConfig,
    pool: ThreadPoolExecutor,
    advance: Callable[[int], None],
) -> None:
    """Compute one shard batch by batch; each batch's pairs are written by `pool` while the next batch
    is computed into the other slot of `ring`; `advance(rows)` after each batch. Returns once every
    write has finished."""
    pending: list[Future | None] = [None] * len(ring)
    per_row = tokens_per_row(rows.shape[1], acts.drop_bos)
    try:
        for step, first in enumerate(range(0, rows.shape[0], batch_rows)):
            slot = step % len(ring)
            if pending[slot] is not None:
                pending[slot].result()  # the slot's previous batch is on disk
            n = capture_rows(
                model,
                rows[first : first + batch_rows],
                ring[slot],
                batch_rows,
                acts.drop_bos,
                acts.hook_in,
                acts.hook_out,
            )
            batch = {layer: MlpPairs(pair.mlp_in[:n], pair.mlp_out[:n]) for layer, pair in ring[slot].items()}
            pending[slot] = pool.submit(writer.write, first * per_row, batch)
            advance(min(batch_rows, rows.shape[0] - first))
    finally:
        wait([f for f in pending if f is not None])  # never leave a write running on a file being removed
    for future in pending:
        if future is not None:
            future.result()  # raises a write error


def write_pairs(
    model: HookedTransformer,
    rows: np.ndarray,
    acts: ActivationsConfig,
    scratch: Path,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    """Cache the pairs of every token row into `scratch`, skipping shards already there.

    `progress(rows_done, rows_total)` is called at the start and after every batch. Returns the
    manifest fields describing the shards. Memory: two batches of pairs per layer (the writer thread
    stores one while the model fills the other).
    """
    layers = list(acts.layers)
    check_capture(model, layers, acts.hook_in, acts.hook_out, rows, acts.drop_bos)
    d_in, d_out = layer_dims(model, acts)
    per_row = tokens_per_row(rows.shape[1], acts.drop_bos)
    shards = plan_shards(rows.shape[0], per_row, acts.shard_tokens)
    plan = {"rows": list(rows.shape), "layers": layers, "dims": [d_in, d_out], "shards": len(shards), **acts.to_dict()}
    plan.pop("batch_rows")
    batch_rows = resume_batch_rows(scratch, plan, acts.batch_rows)
    remove_temp_files(scratch)
    todo = pending_shards(scratch, layers, shards, d_in, d_out, acts.dtype)
    done = [rows.shape[0] - sum(s.row_stop - s.row_start for s in todo)]
    log(f"activations: {len(shards) - len(todo)}/{len(shards)} shards already cached; {len(todo)} to compute")
    progress(done[0], rows.shape[0])

    def advance(n_rows: int) -> None:
        done[0] += n_rows
        progress(done[0], rows.shape[0])

    tokens = torch.from_numpy(np.ascontiguousarray(rows))
    dtype = DTYPES[acts.dtype]
    ring = [allocate_pairs(batch_rows * per_row, d_in, d_out, layers, dtype) for _ in range(2)]  # [batch tokens, d]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        for spec in todo:
            writer = ShardWriter(scratch, layers, spec, d_in, d_out, acts.dtype)
            try:
                rows_of_shard = tokens[spec.row_start : spec.row_stop]
                cache_shard(model, rows_of_shard, writer, ring, batch_rows, acts, pool, advance)
                writer.commit()
            finally:
                writer.abort()
    hooks = {layer: tuple(hook_names(layer, acts.hook_in, acts.hook_out)) for layer in layers}
    fields = manifest_fields(layers, shards, hooks, d_in, d_out, acts.dtype, per_row, acts.drop_bos)
    return {**fields, "d_model": model.cfg.d_model, "batch_rows": batch_rows, "context_size": int(rows.shape[1])}


# ---------------------------------------------------------------- progress and the Prefect task


class StageProgress:
    """A terminal progress bar and, inside a Prefect run, a progress artifact showing the same rows."""

    def __init__(self, key: str, description: str) -> None:
        self.key, self.description = key, description
        self.bar: tqdm | None = None
        self.artifact: Any = None
        self.percent = -1.0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, initial=done, unit="row", desc=self.description)
            self.artifact = _create_artifact(self.key, self.description, _percent(done, total))
        else:
            self.bar.update(done - self.bar.n)
        percent = _percent(done, total)
        if self.artifact is not None and (percent - self.percent >= 1 or done == total):
            self.artifact = _update_artifact(self.artifact, percent)
        self.percent = percent

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 1) if total else 100.0


def _create_artifact(key: str, description: str, percent: float) -> Any:
    """A Prefect progress artifact when running inside a flow or task run; None elsewhere or on failure."""
    from prefect.artifacts import create_progress_artifact
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return None
    try:
        return create_progress_artifact(percent, key=f"activations-{key}", description=description)
    except Exception as err:  # the API being down must not stop the stage
        log(f"activations: no progress artifact ({type(err).__name__}: {err})")
        return None


def _update_artifact(artifact_id: Any, percent: float) -> Any:
    from prefect.artifacts import update_progress_artifact

    try:
        update_progress_artifact(artifact_id, percent)
        return artifact_id
    except Exception as err:
        log(f"activations: progress artifact update failed ({type(err).__name__}: {err}); no further updates")
        return None


def summary(key: str, path: Path, status: str, seconds: float, manifest: dict[str, Any]) -> dict[str, Any]:
    """The stage summary, shaped like tasks.common.build_stage's."""
    return {"stage": STAGE, "key": key, "path": str(path), "status": status, "seconds": seconds, "manifest": manifest}


@task(
    name="cache_activations",
    task_run_name="activations-{key}",
    cache_key_fn=cache_key(STAGE),
    persist_result=True,
)
def cache_activations(cfg: Config, key: str, tokens_key: str, force: bool = False) -> dict[str, Any]:
    """Prefect task: the activations stage (resumable; `force` recomputes every shard)."""
    final = layout.stage_dir(cfg.store.root, STAGE, key)
    if layout.is_complete(final) and not force:
        return summary(key, final, "cached", 0.0, layout.read_manifest(final))
    reason = "forced" if force and layout.is_complete(final) else why_run(cfg.store.root, STAGE, key)
    log(f"{STAGE} {key}: will run: {reason}")
    start = time.perf_counter()
    torch.set_num_threads(cfg.runner.torch_threads)
    rows = load_rows(cfg.store.root, tokens_key)
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    scratch = layout.scratch_dir(cfg.store.root, STAGE, key)
    if force:
        clear_dir(scratch)
    progress = StageProgress(key, f"activations layers {list(cfg.activations.layers)}")
    try:
        fields = write_pairs(model, rows, cfg.activations, scratch, progress)
    finally:
        progress.close()
    (scratch / RESUME_FILE).unlink()
    manifest = {
        **stage_identity(STAGE, key),
        "tokens_key": tokens_key,
        "model": {"name": cfg.model.name, "dtype": cfg.model.dtype},
        "hook_templates": {"in": cfg.activations.hook_in, "out": cfg.activations.hook_out},
        **fields,
        "seconds": round(time.perf_counter() - start, 3),
        **key_provenance(STAGE, key),
    }
    layout.finish_scratch(scratch, final, manifest)
    return {**summary(key, final, "ran", manifest["seconds"], manifest), "reason": reason}

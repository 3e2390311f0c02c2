"""The train stage's own files besides the transcoder folder: the resumable checkpoint (tensors plus JSON
position and history in one safetensors file, never a pickle) and the metrics table of the logged rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
from safetensors import safe_open
from torch import Tensor

from storage import layout
from storage.formats.base import save_tensors

CHECKPOINT = "checkpoint.safetensors"
"""Resumable training state in the scratch dir: tensors plus JSON position/history in the header."""
METRICS = "metrics.parquet"
METRIC_COLUMNS = ("loss", "mse", "sparsity", "aux", "l0", "fvu", "dead", "lr")


def write_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and JSON meta atomically in one safetensors file (through the store's own temp file)."""
    with layout.atomic_file(path) as tmp:
        save_tensors(tensors, tmp, {"meta": json.dumps(meta)})


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(tensors, meta) of a checkpoint file, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return tensors, meta


def metrics_table(history: list[dict[str, float]]) -> pa.Table:
    """Logged rows -> (step int64, tokens int64, loss, mse, sparsity, aux, l0, fvu, dead, lr float64)."""
    columns = {
        "step": pa.array([int(r["step"]) for r in history], pa.int64()),
        "tokens": pa.array([int(r["tokens"]) for r in history], pa.int64()),
    }
    columns.update({name: pa.array([float(r[name]) for r in history], pa.float64()) for name in METRIC_COLUMNS})
    return pa.table(columns)

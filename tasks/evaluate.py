"""Evaluation of trained transcoders on held-out data (docs/method.md section 3): one layer's FVU, L0,
densities and spliced cross-entropy (run inside the train stage), and the `evaluate` stage that splices
every trained layer's transcoder in at once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Int
from prefect import task
from prefect.context import TaskRunContext
from torch import Tensor

from core.config import Config
from core.metrics import (
    PairEval,
    SpliceEval,
    clean_log_probs,
    density_histogram,
    evaluate_pairs,
    log10_density,
    splice_eval,
)
from core.model import load_model, resolve_device
from core.transcoder import Transcoder
from storage import layout
from storage.checkpoints import load_transcoder
from storage.shards import PairSource
from storage.tables import read_tokens
from tasks.common import build_stage, cache_key
from tasks.plan import EVAL_STAGE

TRAIN_STAGE = "train"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
CLEAN_CACHE_BYTES = 2 * 1024**3
"""Largest clean reference (float64 log-probabilities of the held-out CE rows) kept in memory for the
next evaluation of the same rows; a larger one is recomputed by every evaluation."""


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
        ce = shared_clean_splice(cfg, model, held_out, {tc.cfg.layer: tc}, first_pos)
    return eval_summary(pairs, ce, n_ce), torch.from_numpy(log10_density(pairs.density)).float()


class _CleanReference:
    """The clean log-probabilities of the last held-out CE rows evaluated in this process, shared by
    the train tasks of every layer (on the threads runner they run in this process) and the
    all-layers evaluation: one clean forward pass per batch in all instead of one per evaluation.
    The first evaluation to ask computes it while the others wait."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.value: list[torch.Tensor] | None = None

    def get(self, key: tuple, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        with self.lock:
            if self.key != key:
                self.key = self.value = None  # free the old reference before computing the new one
                self.value, self.key = compute(), key
            return self.value

    def release(self) -> None:
        with self.lock:
            self.key = self.value = None


_CLEAN = _CleanReference()


def release_clean_reference() -> None:
    """Free the shared clean reference (after the last evaluation of a run)."""
    _CLEAN.release()


def shared_clean_splice(
    cfg: Config, model: Any, held_out: Int[Tensor, "row pos"], transcoders: dict[int, Any], first_pos: int
) -> SpliceEval:
    """splice_eval with the clean reference shared between evaluations of the same rows on the same
    model weights (recomputed when it would exceed CLEAN_CACHE_BYTES)."""
    batch_rows = cfg.activations.batch_rows
    size = held_out.shape[0] * (held_out.shape[1] - first_pos - 1) * model.cfg.d_vocab * 8
    if size > CLEAN_CACHE_BYTES:
        return splice_eval(model, held_out, transcoders, batch_rows, first_pos)
    weights = sum(float(torch.sum(p.detach(), dtype=torch.float64)) for p in model.parameters())
    rows = hashlib.sha256(held_out.numpy().tobytes()).hexdigest()
    key = (cfg.model.name, cfg.model.dtype, str(model.cfg.device), weights, rows, tuple(held_out.shape),
           batch_rows, first_pos)  # fmt: skip
    clean = _CLEAN.get(key, lambda: clean_log_probs(model, held_out, batch_rows, first_pos))
    return splice_eval(model, held_out, transcoders, batch_rows, first_pos, clean)


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


def build_replacement_eval(cfg: Config, train_keys: dict[int, str], tokens_key: str, tmp: Path) -> dict[str, Any]:
    """CE clean / all transcoders spliced / all MLPs zero-ablated on the held-out rows of the train split."""
    rows = read_tokens(layout.stage_dir(cfg.store.root, "tokens", tokens_key) / "tokens.parquet")
    first_pos = 1 if cfg.activations.drop_bos else 0
    split = split_rows(rows.shape[0] * (rows.shape[1] - first_pos), rows.shape[1] - first_pos, cfg.train.eval_fraction)
    n_ce = min(cfg.train.eval_ce_rows, split.eval_rows)
    device = resolve_device(cfg.model.device)
    tcs = {
        int(layer): load_transcoder(layout.stage_dir(cfg.store.root, TRAIN_STAGE, key), device)
        for layer, key in train_keys.items()
    }
    model = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    held_out = torch.from_numpy(rows[split.n_rows - split.eval_rows :][:n_ce].astype(np.int64))
    ce = shared_clean_splice(cfg, model, held_out, tcs, first_pos)
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

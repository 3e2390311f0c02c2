"""Benchmark of the activations stage on the bundled model: caching throughput against a bare
`stop_at_layer` forward pass of the same batches (measured alternately in one run), and bytes on
disk per token per layer against 2 x d_model x dtype size.

Run: `python bench/bench_activations.py [--quick]` (torch threads: CIRCUITFLOW_BENCH_THREADS,
default 2; under bench/run.py its --threads).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformer_lens import HookedTransformer

from bench import common
from core.config import ActivationsConfig
from core.model import load_model
from storage.shards import DTYPES
from tasks.activations import write_pairs

MODEL = "bundled:smollm2-135m"
LAYERS = (0, 1, 2, 3)
CONTEXT = 128


def token_rows(model: HookedTransformer, n_rows: int, seed: int = 0) -> np.ndarray:
    """Random token ids int32 [row, pos] with the BOS id at position 0 (speed does not depend on content)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, model.cfg.d_vocab, size=(n_rows, CONTEXT), dtype=np.int32)
    bos = getattr(model.tokenizer, "bos_token_id", None)
    rows[:, 0] = 0 if bos is None else bos
    return rows


class Timing(NamedTuple):
    wall: float
    """Elapsed seconds."""
    cpu: float
    """CPU seconds of this process (all threads): less disturbed by other work on a shared machine."""


@contextlib.contextmanager
def timed(into: list[Timing]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))


def run_bare(model: HookedTransformer, rows: np.ndarray, batch_rows: int) -> None:
    """Plain forward passes of the same batches, stopping after the last cached layer."""
    tokens = torch.from_numpy(rows).long()
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch_rows):
            model(tokens[i : i + batch_rows], stop_at_layer=max(LAYERS) + 1)


def run_cache(model: HookedTransformer, rows: np.ndarray, acts: ActivationsConfig, times: list[Timing]) -> float:
    """The stage's own caching loop into a fresh folder (timed into `times`); bytes per token per layer."""
    folder = Path(tempfile.mkdtemp(prefix="bench-activations-"))
    try:
        with timed(times):
            fields = write_pairs(model, rows, acts, folder)
        layer_bytes = sum(p.stat().st_size for p in (folder / f"layer={LAYERS[0]}").iterdir())
        return layer_bytes / fields["n_tokens"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(model: HookedTransformer, rows: np.ndarray, acts: ActivationsConfig, repeats: int) -> dict[str, Any]:
    """Alternate bare and caching runs (swapping which goes first) after a warm-up of each. Speeds use
    the fastest repeat of each (the least disturbed by other work); the median paired ratio is kept too."""
    run_bare(model, rows[: acts.batch_rows], acts.batch_rows)
    run_cache(model, rows[: acts.batch_rows], acts, [])
    bare: list[Timing] = []
    cache: list[Timing] = []
    per_token = 0.0
    for repeat in range(repeats):
        for which in ("bare", "cache") if repeat % 2 == 0 else ("cache", "bare"):
            if which == "bare":
                with timed(bare):
                    run_bare(model, rows, acts.batch_rows)
            else:
                per_token = run_cache(model, rows, acts, cache)
    best_bare, best_cache = min(t.wall for t in bare), min(t.wall for t in cache)
    return {
        "ratio": best_bare / best_cache,
        "cpu_ratio": min(t.cpu for t in bare) / min(t.cpu for t in cache),
        "median_ratio": statistics.median(b.wall / c.wall for b, c in zip(bare, cache, strict=True)),
        "bare_tps": rows.size / best_bare,
        "cache_tps": rows.size / best_cache,
        "bytes": per_token,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    model = load_model(MODEL, device="cpu", dtype="float32")
    rows = token_rows(model, 16 if quick else 64)
    repeats = 2 if quick else 6
    setup = f"{rows.shape[0]} rows x {CONTEXT} tokens, layers {LAYERS[0]}-{LAYERS[-1]}, batch 8 rows, {threads} threads"
    out: list[dict[str, Any]] = []
    start = os.getloadavg()[0]
    for dtype in ("float32",) if quick else ("float32", "bfloat16"):
        acts = ActivationsConfig(layers=LAYERS, dtype=dtype, batch_rows=8, shard_tokens=65536)
        m = measure(model, rows, acts, repeats)
        ideal = 2 * model.cfg.d_model * DTYPES[dtype].itemsize
        speed = f"caching {m['cache_tps']:.0f} tok/s vs bare forward {m['bare_tps']:.0f} tok/s"
        out.append(
            common.row(
                f"activations_cache_vs_forward_{dtype}",
                m["ratio"],
                "x",
                ">= 0.9",
                m["ratio"] >= 0.9,
                f"{speed}, fastest of {repeats} alternating runs each (median paired ratio "
                f"{m['median_ratio']:.3f}, CPU-time ratio {m['cpu_ratio']:.3f}); {setup}; {load(start)}",
            )
        )
        out.append(
            common.row(
                f"activations_bytes_per_token_layer_{dtype}",
                m["bytes"],
                "bytes",
                f"within 1% of {ideal}",
                abs(m["bytes"] / ideal - 1) <= 0.01,
                f"{m['bytes'] / ideal - 1:+.4%} vs 2 x d_model {model.cfg.d_model} x {DTYPES[dtype].itemsize} bytes; "
                f"ratio {m['ratio']:.3f} ({speed})",
            )
        )
    return out


def load(start: float) -> str:
    return f"load average {start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


if __name__ == "__main__":
    common.main(run, __doc__)

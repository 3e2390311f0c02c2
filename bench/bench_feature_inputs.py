"""Benchmark of dataset-level attribution (the feature_inputs stage) on the bundled model: seconds
per context of `core.dataset_attribution.dataset_inputs` (one forward pass per token row, the
contexts of a row batched) against the naive loop (one forward pass and one decomposition per
context), for the most frequent layer-3 features over a few rows of text, on CPU.

Transcoders as in bench_trace (a trained store, else random ones with about 64 active features per
token). Run: `python -m bench.bench_feature_inputs [--quick]`.
"""

from __future__ import annotations

import time

import torch

from bench import common
from bench.bench_trace import LAYERS, MODEL, PROMPT, _row, random_transcoders
from core import attribution
from core.dataset_attribution import dataset_inputs
from core.model import load_model

ROW_TOKENS = 64
PER_CONTEXT_TARGET_S = 0.05
"""Batched dataset attribution, per context (a layer-3 root on a 64-token row)."""


def text_rows(model, n_rows: int) -> torch.Tensor:
    """[n_rows, ROW_TOKENS] token rows (BOS first) cut from varied sentences."""
    words = PROMPT.split()
    rows = []
    for i in range(n_rows):
        text = " ".join(words[i % len(words) :] + words[: i % len(words)]) + " " + PROMPT
        rows.append(model.to_tokens(text)[0][:ROW_TOKENS])
    return torch.stack(rows)


def naive(model, transcoders, rows, contexts) -> float:
    """Seconds for the per-context loop: prepare on the row cut at the position, decompose the root."""
    start = time.perf_counter()
    for (layer, feature), ctxs in contexts.items():
        for row, pos in ctxs:
            state = attribution.prepare(model, transcoders, rows[row, : pos + 1], max_layer=layer)
            attribution.children(state, attribution.feature_root(state, layer, feature, -1))
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict]:
    model = load_model(MODEL, device="cpu")
    rows = text_rows(model, 4 if quick else 12)
    transcoders = common.trained_transcoders(LAYERS)
    source = "trained" if transcoders else "random, ~64 active per token"
    transcoders = transcoders or random_transcoders(model, rows[0])
    z3 = [attribution.prepare(model, transcoders, r, max_layer=3).z[3] for r in rows]  # [pos d_sae] per row
    counts = sum((z[1:] > 0).sum(0) for z in z3)
    features = torch.topk(counts, 2 if quick else 4).indices.tolist()
    contexts = {
        (3, f): [(i, int(p) + 1) for i, z in enumerate(z3) for p in torch.nonzero(z[1:, f] > 0).flatten()]
        for f in features
    }
    n = sum(len(c) for c in contexts.values())
    start = time.perf_counter()
    dataset_inputs(model, transcoders, rows, contexts)
    batched = (time.perf_counter() - start) / max(n, 1)
    sample = {k: v[: 4 if quick else 8] for k, v in contexts.items()}
    slow = naive(model, transcoders, rows, sample) / max(sum(len(v) for v in sample.values()), 1)
    note = f"{len(features)} layer-3 features, {n} contexts on {len(rows)} rows of {ROW_TOKENS} tokens, transcoders: {source}"
    return [
        _row("feature_inputs: seconds per context (batched per row)", batched, "s", PER_CONTEXT_TARGET_S, note),
        _row("feature_inputs: seconds per context (naive loop)", slow, "s", None, "one forward pass per context"),
        _row("feature_inputs: speed-up of batching", slow / max(batched, 1e-9), "x", 1.0, "", lower_is_better=False),
    ]


if __name__ == "__main__":
    common.main(run, __doc__)

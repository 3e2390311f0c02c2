"""Benchmark of circuit tracing on the bundled model: the paper's path search per root and the full
attribution graph (build + prune) for a 32-token prompt with transcoders on layers 0-3, on CPU.

Transcoders come from a store (CIRCUITFLOW_BENCH_STORE, default ./store: one the default config
trained, read through its runs/latest.json) or, without one, are random with biases set for about 64 active
features per token (speed depends on the number of active features, not on their meaning).

Run: `python bench/bench_trace.py [--quick]` (torch threads: CIRCUITFLOW_BENCH_THREADS, default 2).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from bench import common
from core import attribution, graph
from core import paths as search
from core.model import load_model
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder

MODEL = "bundled:smollm2-135m"
LAYERS = (0, 1, 2, 3)
PROMPT = (
    "The function returns a list of strings, one for each line of the file. If the file does not exist, "
    "it raises an error and the caller decides what to do next."
)
N_TOKENS = 32
TARGET_L0 = 64
PATH_TARGET_S = 1.0
"""Path search (3 iterations, 15 branches) per root."""
FULL_TARGET_S = 60.0
"""Full graph (2048 traced features) plus pruning."""


def random_transcoders(model: Any, tokens: torch.Tensor) -> dict[int, Transcoder]:
    """Random transcoders whose encoder bias leaves about TARGET_L0 features active per token."""
    d = model.cfg.d_model
    names = [f"blocks.{layer}.ln2.hook_normalized" for layer in LAYERS]
    _, cache = model.run_with_cache(tokens[None], names_filter=names, stop_at_layer=max(LAYERS) + 1)
    out = {}
    for layer, name in zip(LAYERS, names, strict=True):
        cfg = TranscoderConfig(d, 4 * d, d, hook_in=name, hook_out=f"blocks.{layer}.hook_mlp_out", layer=layer)
        tc = init_transcoder(cfg, seed=layer)
        with torch.no_grad():
            pre = cache[name][0] @ tc.W_enc  # [pos d_sae]
            tc.b_enc.fill_(-float(torch.quantile(pre.flatten(), 1 - TARGET_L0 / (4 * d))))
        out[layer] = tc
    return out


def _row(name: str, value: float, unit: str, target: float | None, note: str, lower_is_better: bool = True) -> dict:
    met = None if target is None else (value <= target if lower_is_better else value >= target)
    shown = "" if target is None else f"{'<=' if lower_is_better else '>='} {target:g}"
    return common.row(name, float(f"{value:.4g}"), unit, shown, met, note)


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_BENCH_THREADS", "2")))
    model = load_model(MODEL, device="cpu")
    tokens = model.to_tokens(PROMPT)[0][:N_TOKENS]
    transcoders = common.trained_transcoders(LAYERS)
    source = f"trained ({common.store()})" if transcoders else f"random, ~{TARGET_L0} active per token"
    transcoders = transcoders or random_transcoders(model, tokens)

    start = time.perf_counter()
    state = attribution.prepare(model, transcoders, tokens, max_layer=max(LAYERS))
    t_prepare = time.perf_counter() - start
    l0 = statistics.mean(float((state.z[layer] != 0).sum(-1).float().mean()) for layer in LAYERS)
    roots = [
        attribution.feature_root(state, 3, int(f), -1) for f in torch.topk(state.z[3][-1], 3 if quick else 8).indices
    ]

    times = []
    for root in roots:
        start = time.perf_counter()
        search.trace(state, root, num_iters=3, num_branches=15)
        times.append(time.perf_counter() - start)
    t_paths = statistics.median(times)

    root = roots[0]
    cap = 512 if quick else 2048
    start = time.perf_counter()
    g = graph.full_graph(state, [root], max_features=cap)
    t_full = time.perf_counter() - start
    start = time.perf_counter()
    pruned = graph.prune_graph(g)
    t_prune = time.perf_counter() - start
    targets = list(range(g.n_features)) + [g.n_nodes - 1]
    recon = g.adjacency[targets].sum(1) + g.bias[targets]
    rel = float(((recon - g.value[targets]).abs() / g.value[targets].abs().clamp_min(1e-3)).max())
    active = sum(int((state.z[layer][: root.pos + 1] != 0).sum()) for layer in LAYERS if layer < 3)
    note = f"{N_TOKENS} tokens, layer-3 root, transcoders: {source}, mean L0 {l0:.0f}"
    rows = [
        _row("trace: prepare (forward + freeze)", t_prepare, "s", None, note),
        _row("trace: path search per root (3 iters, 15 branches)", t_paths, "s", PATH_TARGET_S, f"median of {len(roots)} roots"),
        _row(f"trace: full graph ({g.n_features} of {active} active features traced)", t_full, "s", FULL_TARGET_S, note),
        _row("trace: prune full graph (0.8 / 0.98)", t_prune, "s", None, f"{int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges kept of {g.n_nodes} nodes"),
        _row("trace: full graph per traced feature", 1000 * t_full / max(g.n_features, 1), "ms", None, "one batched backward row each"),
        _row("trace: max |row sum + bias - value| / |value|", rel, "ratio", 1e-4, "every target's edges sum to its value (float32)"),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)

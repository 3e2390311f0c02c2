"""Benchmark of interventions on the bundled model: runs per second on a 32-token prompt with
transcoders spliced in at layers 0-3, attention recomputed (the real effect) and frozen (the
linearised effect), next to a plain forward pass of the same prompt, on CPU.

Transcoders come from a store (CIRCUITFLOW_BENCH_STORE, default ./store) or, without one, are random
with about 64 active features per token (bench_trace.random_transcoders).

Run: `python bench/bench_interventions.py [--quick]` (torch threads: CIRCUITFLOW_BENCH_THREADS, default 1;
rates are per CPU second).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import common
from bench.bench_trace import LAYERS, MODEL, N_TOKENS, PROMPT, random_transcoders
from core.interventions import HeadAblation, Spliced, ablate_feature
from core.model import load_model


def _rate(fn: Callable[[], Any], repeats: int) -> float:
    """Calls per CPU second: the median CPU time (all threads of this process) of `repeats` calls after
    a warm-up call. CPU time, not wall time, so the figure holds on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1 / statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(int(os.environ.get("CIRCUITFLOW_BENCH_THREADS", "1")))
    torch.set_grad_enabled(False)
    model = load_model(MODEL, device="cpu")
    tokens = model.to_tokens(PROMPT)[0][:N_TOKENS]
    transcoders = common.trained_transcoders(LAYERS)
    source = f"trained ({common.store()})" if transcoders else "random, ~64 active per token"
    transcoders = transcoders or random_transcoders(model, tokens)
    start = time.process_time()
    spliced = Spliced(model, transcoders, tokens)
    t_setup = time.process_time() - start
    feature = int(torch.argmax(spliced.clean_acts[1][10]))
    batch = [ablate_feature(1, feature, 10), HeadAblation(2, 3)]
    repeats = 5 if quick else 20
    forward = _rate(lambda: model(tokens[None]), repeats)
    real = _rate(lambda: spliced.run(batch), repeats)
    frozen = _rate(lambda: spliced.run(batch, frozen=True), repeats)
    gap = float((spliced.run([]).logits - model(tokens[None])[0]).abs().max())
    note = (
        f"{N_TOKENS} tokens, layers {list(LAYERS)} spliced, transcoders: {source}; a feature and a head ablated; "
        f"CPU time, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    return [
        common.row("interventions: setup (clean run + cache)", t_setup, "CPU s", note=note),
        common.row(
            "interventions per CPU second, recomputed",
            real,
            "runs/CPU s",
            note=f"{real / forward:.2f} x plain forwards",
        ),
        common.row(
            "interventions per CPU second, frozen",
            frozen,
            "runs/CPU s",
            note=f"{frozen / forward:.2f} x plain forwards",
        ),
        common.row("plain forward passes per CPU second", forward, "runs/CPU s", note="the same prompt, no hooks"),
        common.row("empty intervention: max |logit - model logit|", gap, "", "<= 1e-6", gap <= 1e-6, "float32"),
    ]


if __name__ == "__main__":
    common.main(run, __doc__)

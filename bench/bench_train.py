"""Training throughput: tokens/s of core.train.fit and its achieved GFLOP/s against bare matmuls of
the same shapes timed in the same run (the ratio says how much the loop costs beyond the math).

    .venv/bin/python -m bench.bench_train [--quick]
"""

from __future__ import annotations

import dataclasses
import time

import torch

from bench import common
from core.activations import PairBatches
from core.config import TrainConfig
from core.train import fit, new_transcoder, transcoder_config

D_MODEL = 576
"""The bundled model's width (SmolLM2-135M), so shapes match the default experiment."""
RATIO_TARGET = 0.5
"""fit should reach at least half the GFLOP/s of its bare matmuls."""


class RandomPairs(PairBatches):
    """In-memory random pairs (content does not change dense throughput)."""

    def __init__(self, n_tokens: int, d: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_tokens, d, generator=gen)  # [token, d_in]
        self.y = torch.randn(n_tokens, d, generator=gen) * 0.1  # [token, d_out]
        self.n_tokens, self.d_in, self.d_out = n_tokens, d, d

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]


def step_flops(batch: int, d_in: int, d_sae: int, d_out: int) -> int:
    """Matmul FLOPs of one training step: encoder and decoder forward, and their three backward products."""
    return 2 * batch * d_sae * (2 * d_in + 3 * d_out)


def matmul_seconds(batch: int, d_in: int, d_sae: int, d_out: int, repeats: int) -> float:
    """Seconds per step of the bare matmuls a step needs (same shapes, float32)."""
    gen = torch.Generator().manual_seed(1)
    x, w_enc = torch.randn(batch, d_in, generator=gen), torch.randn(d_in, d_sae, generator=gen)
    z, w_dec = torch.randn(batch, d_sae, generator=gen), torch.randn(d_sae, d_out, generator=gen)
    g = torch.randn(batch, d_out, generator=gen)

    def once() -> None:
        x @ w_enc  # forward encoder   [batch, d_sae]
        z @ w_dec  # forward decoder   [batch, d_out]
        z.T @ g  # grad W_dec         [d_sae, d_out]
        g @ w_dec.T  # grad z         [batch, d_sae]
        x.T @ z  # grad W_enc         [d_in, d_sae]

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def fit_seconds(cfg: TrainConfig, source: RandomPairs) -> float:
    """Seconds per step of fit (bias init excluded: timed from the first callback)."""
    tc = new_transcoder(cfg, transcoder_config(cfg, source.d_in, source.d_out, "in", "out"))
    marks: list[float] = []
    fit(tc, source, cfg, [lambda state, row: marks.append(time.perf_counter())])
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def run(quick: bool = False) -> list[dict]:
    steps = 8 if quick else 40
    base = TrainConfig()
    batch, d_sae = base.batch_size, base.expansion_factor * D_MODEL
    source = RandomPairs(batch * (steps + 1), D_MODEL)
    flops = step_flops(batch, D_MODEL, d_sae, D_MODEL)
    bare = matmul_seconds(batch, D_MODEL, d_sae, D_MODEL, steps)
    rows = [common.row("matmul GFLOP/s (same shapes)", flops / bare / 1e9, "GFLOP/s", "", None, "reference")]
    for activation in ("relu", "topk", "jumprelu"):
        cfg = dataclasses.replace(base, activation=activation, epochs=1, init_tokens=batch, dead_revival="none")
        per_step = fit_seconds(cfg, source)
        ratio = bare / per_step
        note = f"{per_step * 1e3:.0f} ms/step, batch {batch}, d_sae {d_sae}, {torch.get_num_threads()} threads"
        rows.append(common.row(f"train {activation} tokens/s", batch / per_step, "tokens/s", "", None, note))
        rows.append(common.row(f"train {activation} GFLOP/s", flops / per_step / 1e9, "GFLOP/s", "", None, note))
        met = ratio >= RATIO_TARGET
        rows.append(common.row(f"train {activation} / matmul", ratio, "ratio", f">= {RATIO_TARGET}", met, "same run"))
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)

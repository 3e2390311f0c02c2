"""Training step cost as a multiple of its floor, everything timed side by side in one process.

The floor is the five dense matmuls a step needs (encoder and decoder forward, decoder weight grad,
grad of the activations, encoder weight grad). Timed against it: circuitflow's steps through
core.train.fit (relu, topk, batchtopk, jumprelu), two reference steps written here (the original research
code's formulation: dense ReLU, decoder-norm-weighted L1, ghost grads, plain Adam; a plain fused
sparse TopK step: dense encode + top-k, embedding-bag decode, autograd's index-add backward) and
the pieces of the TopK step, dense against sparse. Rounds are interleaved; each figure is the
fastest round. Times are the process's CPU time (time.process_time), so other processes on a shared
machine inflate them less than wall time; with --threads 1 on a quiet machine the two agree.

    .venv/bin/python -m bench.bench_train [--quick]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import common
from core import topk
from core.batches import PairBatches
from core.config import TrainConfig
from core.train import fit, ghost_grad_loss, new_transcoder, remove_parallel_grad, transcoder_config
from core.transcoder import Transcoder

D_MODEL = 576
"""The bundled model's width (SmolLM2-135M), so shapes match the default experiment."""
TARGETS = {"relu": 1.3, "topk": 1.2, "batchtopk": 1.2, "jumprelu": 1.4}
"""Step time over the floor each of circuitflow's steps should stay under."""
K = 64
"""Active features per token of the TopK steps (the default)."""
CLOCK = time.process_time
"""CPU time of this process (see the module docstring)."""
DEAD_FRACTION = 0.01
"""Features the original code's step treats as dead (its ghost-grad term runs on them)."""


class RandomPairs(PairBatches):
    """In-memory random pairs (content does not change dense throughput)."""

    def __init__(self, n_tokens: int, d: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_tokens, d, generator=gen)  # [token, d_in]
        self.y = torch.randn(n_tokens, d, generator=gen) * 0.1  # [token, d_out]
        self.n_tokens, self.d_in, self.d_out = n_tokens, d, d

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]


class Shapes:
    """Random tensors of one step's shapes (float32)."""

    def __init__(self, batch: int, d_sae: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(batch, D_MODEL, generator=gen), torch.randn(batch, D_MODEL, generator=gen) * 0.1
        self.w_enc = torch.randn(D_MODEL, d_sae, generator=gen) / D_MODEL**0.5
        self.w_dec = torch.nn.functional.normalize(torch.randn(d_sae, D_MODEL, generator=gen), dim=-1)
        self.pre = self.x @ self.w_enc  # [batch, d_sae]
        self.values, self.indices = self.pre.topk(K, sorted=False)
        self.indices, order = self.indices.sort(dim=-1)
        self.acts = self.values.gather(-1, order).relu()  # [batch, k]
        self.z = torch.zeros_like(self.pre).scatter(-1, self.indices, self.acts)  # [batch, d_sae]
        self.pairs = topk.per_token(self.pre, K)
        self.g = torch.randn(batch, D_MODEL, generator=gen)  # [batch, d_out]
        previous = torch.randn(batch, D_MODEL, generator=gen) @ self.w_enc  # another batch of the same kind
        self.threshold = topk.per_batch(previous, K).vals.min()  # its smallest kept value: the hint in training


def floor(s: Shapes) -> None:
    """The five dense matmuls of a step."""
    s.x @ s.w_enc  # encoder forward        [batch, d_sae]
    s.z @ s.w_dec  # decoder forward        [batch, d_out]
    s.z.T @ s.g  # decoder weight grad      [d_sae, d_out]
    s.g @ s.w_dec.T  # grad of activations  [batch, d_sae]
    s.x.T @ s.z  # encoder weight grad      [d_in, d_sae]


def pieces(s: Shapes) -> dict[str, Callable[[], object]]:
    """The TopK step's parts, dense formulation next to the sparse one core.topk uses."""
    by_feature = topk.FeatureMajor(s.pairs)
    return {
        "encoder forward (dense matmul)": lambda: s.x @ s.w_enc,
        "encoder forward, bfloat16 autocast": lambda: _autocast_matmul(s.x, s.w_enc),
        "top-k selection, sorted": lambda: s.pre.topk(K),
        "top-k selection, unsorted (core.topk.select)": lambda: topk.select(s.pre, K),
        "batch top-k pairs, no screen": lambda: topk.per_batch(s.pre, K),
        "batch top-k pairs, screened (core.topk.per_batch)": lambda: topk.per_batch(s.pre, K, s.threshold),
        "decoder forward, dense matmul": lambda: s.z @ s.w_dec,
        "decoder forward, embedding_bag": lambda: topk.decode(s.pairs, s.w_dec),
        "grad of active acts, dense matmul + gather": lambda: (s.g @ s.w_dec.T).gather(-1, s.indices),
        "grad of active acts, SDDMM": lambda: topk.active_grads(s.pairs, s.g, s.w_dec),
        "decoder weight grad, dense matmul": lambda: s.z.T @ s.g,
        "decoder weight grad, index_add of outer products": lambda: _index_add_grad(s),
        "decoder weight grad, feature-major CSR": lambda: by_feature.matmul(s.pairs.vals, s.g),
        "encoder weight grad, dense matmul": lambda: s.x.T @ s.z,
        "encoder weight grad, feature-major CSR (+ transpose)": lambda: by_feature.matmul(
            s.pairs.vals, s.x
        ).T.contiguous(),
        "feature-major index (argsort, searchsorted)": lambda: topk.FeatureMajor(s.pairs),
    }


def _autocast_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.autocast(a.device.type, torch.bfloat16):
        return a @ b


def _index_add_grad(s: Shapes) -> torch.Tensor:
    outer = s.acts.reshape(-1, 1) * s.g.repeat_interleave(K, dim=0)  # [batch * k, d_out]
    return torch.zeros_like(s.w_dec).index_add_(0, s.indices.reshape(-1), outer)


# ---------------------------------------------------------------- the two reference steps


def reference_tc(activation: str, d_sae: int) -> tuple[Transcoder, torch.optim.Optimizer]:
    cfg = TrainConfig(activation=activation, k=K)  # type: ignore[arg-type]
    tc = new_transcoder(cfg, transcoder_config(cfg, D_MODEL, D_MODEL, "in", "out"))
    assert tc.cfg.d_sae == d_sae
    return tc, torch.optim.Adam(tc.parameters(), lr=1e-4)


def original_relu_step(tc: Transcoder, opt: torch.optim.Optimizer, s: Shapes, dead: torch.Tensor) -> None:
    """The original code's step: dense ReLU, decoder-norm-weighted L1, ghost grads, plain Adam."""
    opt.zero_grad(set_to_none=True)
    pre = (s.x - tc.b_dec) @ tc.W_enc + tc.b_enc
    z = torch.relu(pre)
    out = z @ tc.W_dec + tc.b_dec_out
    mse = (out - s.y).pow(2).mean()
    l1 = (z * tc.W_dec.norm(dim=-1)).sum(-1).mean()
    ghost = ghost_grad_loss(tc, pre, s.y - out.detach(), mse, dead)
    (mse + 1e-3 * l1 + ghost).backward()
    remove_parallel_grad(tc)
    opt.step()
    tc.normalize_decoder()


def plain_sparse_topk_step(tc: Transcoder, opt: torch.optim.Optimizer, s: Shapes) -> None:
    """Dense encode + top-k, embedding-bag decode, autograd's backward (index_add into the weights)."""
    opt.zero_grad(set_to_none=True)
    pre = (s.x - tc.b_dec) @ tc.W_enc + tc.b_enc
    values, indices = pre.topk(K, dim=-1)
    out = F.embedding_bag(indices, tc.W_dec, per_sample_weights=values.relu(), mode="sum") + tc.b_dec_out
    (out - s.y).pow(2).mean().backward()
    opt.step()
    tc.normalize_decoder()


# ---------------------------------------------------------------- circuitflow's steps through fit


def fit_seconds(cfg: TrainConfig, source: RandomPairs) -> float:
    """Seconds per step of fit (bias init and the first step excluded: timed between callbacks)."""
    tc = new_transcoder(cfg, transcoder_config(cfg, source.d_in, source.d_out, "in", "out"))
    marks: list[float] = []
    fit(tc, source, cfg, [lambda state, row: marks.append(CLOCK())])
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = CLOCK()
    for _ in range(repeats):
        fn()
    return (CLOCK() - start) / repeats


def run(quick: bool = False) -> list[dict]:
    steps, rounds = (4, 1) if quick else (12, 3)
    base = TrainConfig(k=K, epochs=1, dead_revival="none", log_every=10)
    batch, d_sae = base.batch_size, base.expansion_factor * D_MODEL
    source = RandomPairs(batch * (steps + 1), D_MODEL)
    s = Shapes(batch, d_sae)
    relu_tc, relu_opt = reference_tc("relu", d_sae)
    topk_tc, topk_opt = reference_tc("topk", d_sae)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: int(d_sae * DEAD_FRACTION)] = True
    timed: dict[str, Callable[[], float]] = {"floor": lambda: per_call(lambda: floor(s), steps)}
    for activation in TARGETS:
        cfg = dataclasses.replace(base, activation=activation, init_tokens=batch)  # type: ignore[arg-type]
        timed[f"circuitflow {activation} (core.train.fit)"] = lambda cfg=cfg: fit_seconds(cfg, source)
    timed["original code: relu + L1, ghost grads"] = lambda: per_call(
        lambda: original_relu_step(relu_tc, relu_opt, s, dead), steps
    )
    timed["plain fused sparse topk"] = lambda: per_call(lambda: plain_sparse_topk_step(topk_tc, topk_opt, s), steps)
    for name, fn in pieces(s).items():
        timed[name] = lambda fn=fn: per_call(fn, steps)
    best = {name: float("inf") for name in timed}
    for _ in range(rounds):  # interleaved: every candidate once per round
        for name, measure in timed.items():
            best[name] = min(best[name], measure())
    return rows(best, batch, d_sae, rounds)


def rows(best: dict[str, float], batch: int, d_sae: int, rounds: int) -> list[dict]:
    note = f"batch {batch}, {D_MODEL} -> {d_sae}, k {K}, {torch.get_num_threads()} threads, fastest of {rounds} rounds"
    out = [common.row("train floor: 5 dense matmuls", best["floor"] * 1e3, "ms", "", None, note)]
    for name, seconds in best.items():
        if name == "floor":
            continue
        ratio = seconds / best["floor"]
        activation = next((a for a in TARGETS if name == f"circuitflow {a} (core.train.fit)"), None)
        if activation is not None:
            target, met = f"<= {TARGETS[activation]}", ratio <= TARGETS[activation]
        else:
            target, met = "", None
        kind = "step" if activation or name.startswith(("original", "plain")) else "piece"
        out.append(common.row(f"train {kind}: {name}", ratio, "x floor", target, met, f"{seconds * 1e3:.1f} ms"))
    return out


if __name__ == "__main__":
    common.main(run, __doc__)

"""Transcoder training (docs/method.md section 2): the `fit` loop around core.train_steps.train_step.

`fit` draws shuffled (mlp_in, mlp_out) batches from a pair source (storage.shards or a streaming
source), runs Adam with a learning-rate schedule, tracks dead features and revives them, and hands
its whole `TrainState` to callbacks (checkpoints, logging). Resuming from a state reproduces an
uninterrupted run: data order depends only on (seed, epoch) and resampling only on (seed, step).
The loss lives in core.losses, the step in core.train_steps (TopK's sparse pieces in core.topk),
the resumable state in core.train_state; this module re-exports their public names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from core.config import TOPK_ACTIVATIONS, TrainConfig
from core.errors import UserError
from core.losses import (  # noqa: F401 (re-exported)
    GHOST_SCALE,
    LossOutput,
    aux_k_loss,
    compute_loss,
    ghost_grad_loss,
    jumprelu_ste,
    step_ste,
)
from core.train_state import TrainState, new_state, restore_state, state_meta, state_tensors  # noqa: F401
from core.train_steps import StepMetrics, reference_step, remove_parallel_grad, train_step  # noqa: F401
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder

SAMPLE_BLOCK = 1024
"""Contiguous tokens per random block when sampling pairs for initialisation and resampling."""
RESAMPLE_ENCODER_SCALE = 0.2
"""Resampled encoder rows get this fraction of the mean live encoder norm (Anthropic's choice)."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class PairSource(Protocol):
    """What fit reads: core.batches.ShuffledPairs (over the activation cache) or core.streaming.StreamingPairSource."""

    n_tokens: int
    d_in: int
    d_out: int

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]: ...

    def batches(
        self, batch_size: int, seed: int, epoch: int, start_batch: int = 0, stop_token: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]: ...

    def num_batches(self, batch_size: int, stop_token: int | None = None) -> int: ...


# ---------------------------------------------------------------- what is trained


def select_pair(
    kind: str, mlp_in: Float[Tensor, "batch d_in"], mlp_out: Float[Tensor, "batch d_out"]
) -> tuple[Tensor, Tensor]:
    """(input, target) of a kind: transcoders map MLP in -> out; SAEs reconstruct one side."""
    if kind == "sae_mlp_out":
        return mlp_out, mlp_out
    if kind == "sae_mlp_in":
        return mlp_in, mlp_in
    return mlp_in, mlp_out


def transcoder_config(
    cfg: TrainConfig, d_in: int, d_out: int, hook_in: str, hook_out: str, layer: int = -1, model_name: str = ""
) -> TranscoderConfig:
    """The module shape for a TrainConfig and a layer's (input, output) hooks and widths."""
    if cfg.kind == "sae_mlp_out":
        d_in, hook_in = d_out, hook_out
    elif cfg.kind == "sae_mlp_in":
        d_out, hook_out = d_in, hook_in
    return TranscoderConfig(
        d_in=d_in,
        d_sae=cfg.expansion_factor * d_in,
        d_out=d_out,
        activation="jumprelu" if cfg.activation == "batchtopk" else cfg.activation,  # saved as trained
        k=cfg.k,
        skip=cfg.kind == "skip_transcoder",
        hook_in=hook_in,
        hook_out=hook_out,
        layer=layer,
        model_name=model_name,
    )


def new_transcoder(cfg: TrainConfig, tc_cfg: TranscoderConfig) -> Transcoder:
    """A freshly initialised transcoder (Kaiming-uniform, unit decoder rows, jumprelu threshold set;
    batch top-k's stays 0 until its first step sets it)."""
    tc = init_transcoder(tc_cfg, seed=cfg.seed)
    if tc.threshold is not None and cfg.activation == "jumprelu":
        with torch.no_grad():
            tc.threshold.fill_(cfg.jumprelu_init_threshold)
    return tc


# ---------------------------------------------------------------- schedules


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based) for the configured schedule."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "warmup" or step < cfg.warmup_steps:
        return warm
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress * (1.0 - cfg.lr_final_fraction)
    return cfg.lr_final_fraction + (1.0 - cfg.lr_final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sparsity_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the sparsity coefficient: ramps linearly from 0 over `sparsity_warmup_steps`."""
    if cfg.sparsity_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.sparsity_warmup_steps)


# ---------------------------------------------------------------- initialisation from data


def sample_pairs(
    source: PairSource, n_tokens: int, generator: torch.Generator, stop_token: int | None = None
) -> tuple[Tensor, Tensor]:
    """About `n_tokens` pairs from random contiguous blocks of [0, stop_token), without replacement."""
    stop = source.n_tokens if stop_token is None else stop_token
    n_blocks = -(-stop // SAMPLE_BLOCK)
    take = min(n_blocks, max(1, -(-n_tokens // SAMPLE_BLOCK)))
    chosen = torch.randperm(n_blocks, generator=generator)[:take].sort().values
    parts = [source.read(int(b) * SAMPLE_BLOCK, min(stop, (int(b) + 1) * SAMPLE_BLOCK)) for b in chosen]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def geometric_median(points: Float[Tensor, "n d"], iters: int = 100, tol: float = 1e-6) -> Float[Tensor, " d"]:
    """The point minimising the sum of Euclidean distances (Weiszfeld's iterations, float64)."""
    pts = points.double()
    median = pts.mean(0)
    for _ in range(iters):
        weights = 1.0 / (pts - median).norm(dim=-1).clamp_min(1e-12)  # [n]
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        shift = (new - median).norm() / median.norm().clamp_min(1e-12)
        median = new
        if shift < tol:
            break
    return median.to(points.dtype)


@torch.no_grad()
def init_biases(tc: Transcoder, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"], method: str) -> None:
    """b_dec = mean or geometric median of the inputs (or zeros); b_dec_out = mean of the targets."""
    if method == "mean":
        tc.b_dec.copy_(x.mean(0))
    elif method == "geometric_median":
        tc.b_dec.copy_(geometric_median(x))
    else:
        tc.b_dec.zero_()
    tc.b_dec_out.copy_(y.mean(0))


# ---------------------------------------------------------------- training state


# ---------------------------------------------------------------- dead-feature resampling


@torch.no_grad()
def resample_dead(state: TrainState, source: PairSource, cfg: TrainConfig, stop_token: int | None = None) -> int:
    """Anthropic-style resampling: each dead feature is re-pointed at a high-loss training pair.

    Pairs are drawn with probability proportional to their squared loss; the decoder row becomes
    the unit residual y - y_hat of that pair, the encoder column the centred input scaled to
    RESAMPLE_ENCODER_SCALE times the mean live encoder norm, b_enc 0, and the Adam moments of the
    touched rows are reset. Returns the number of features resampled.
    """
    tc, dead = state.transcoder, state.dead_mask(cfg.dead_window)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)
    x_in, x_out = sample_pairs(source, cfg.resample_tokens, gen, stop_token)
    x, y = (t.to(tc.device) for t in select_pair(cfg.kind, x_in, x_out))
    residual = y - tc(x).out  # [n, d_out]
    weights = residual.pow(2).sum(-1).pow(2).double()  # squared loss per pair
    picks = torch.multinomial(weights.cpu(), n_dead, replacement=n_dead > len(weights), generator=gen)
    idx = dead.nonzero().squeeze(-1)  # [n_dead]
    enc_norm = tc.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else torch.tensor(1.0)
    directions = residual[picks.to(tc.device)]
    tc.W_dec[idx] = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    inputs = x[picks.to(tc.device)] - tc.b_dec
    inputs = inputs / inputs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    tc.W_enc[:, idx] = (inputs * enc_norm * RESAMPLE_ENCODER_SCALE).T
    tc.b_enc[idx] = 0.0
    _reset_adam_rows(state.optimizer, tc, idx)
    state.steps_since_fired[idx] = 0
    return n_dead


def _reset_adam_rows(optimizer: torch.optim.Optimizer, tc: Transcoder, idx: Tensor) -> None:
    """Zero the Adam moments of the features `idx` in W_enc (columns), b_enc and W_dec (rows)."""
    for param, select in ((tc.W_enc, (slice(None), idx)), (tc.b_enc, (idx,)), (tc.W_dec, (idx,))):
        moments = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                moments[key][select] = 0.0


# ---------------------------------------------------------------- the loop

Callback = Callable[[TrainState, dict[str, float] | None], None]
"""Called after every step with the state and the metrics row when one was logged (else None)."""


def fit(
    tc: Transcoder,
    source: PairSource,
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    stop_token: int | None = None,
    state: TrainState | None = None,
) -> TrainState:
    """Train `tc` for cfg.epochs over tokens [0, stop_token) of `source`; resume from `state` if given.

    A fresh run initialises b_dec / b_dec_out from sampled pairs first. Raises TrainingDivergedError
    when the loss or the weights stop being finite (checked at every logged step).
    """
    if state is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        x, y = select_pair(cfg.kind, *sample_pairs(source, cfg.init_tokens, gen, stop_token))
        init_biases(tc, x.to(tc.device), y.to(tc.device), cfg.init_b_dec)
        state = new_state(tc, cfg)
    total = source.num_batches(cfg.batch_size, stop_token) * cfg.epochs
    while state.epoch < cfg.epochs:
        for x_in, x_out in source.batches(cfg.batch_size, cfg.seed, state.epoch, state.batch, stop_token):
            row = _advance(state, source, cfg, x_in, x_out, total, stop_token)
            for callback in callbacks:
                callback(state, row)
        state.epoch, state.batch = state.epoch + 1, 0
    return state


def _advance(
    state: TrainState,
    source: PairSource,
    cfg: TrainConfig,
    x_in: Tensor,
    x_out: Tensor,
    total: int,
    stop_token: int | None,
) -> dict[str, float] | None:
    """One step of fit: train, update counters and position, resample, log (metrics only when logged)."""
    check_batch(state, {"mlp_in": x_in, "mlp_out": x_out}, source)  # before it can reach the weights
    tc = state.transcoder
    x, y = (t.to(tc.device, non_blocking=True) for t in select_pair(cfg.kind, x_in, x_out))
    lr = cfg.lr * lr_factor(state.step, total, cfg)
    revive = cfg.activation in TOPK_ACTIVATIONS or cfg.dead_revival == "ghost_grads"
    # steps_since_fired <= step always, so no feature can be dead before dead_window steps
    dead = state.dead_mask(cfg.dead_window) if revive and state.step >= cfg.dead_window else None
    logged = (state.step + 1) % cfg.log_every == 0 or state.step + 1 == total
    scale = sparsity_factor(state.step, cfg)
    metrics = train_step(tc, state.optimizer, x, y, cfg, lr, dead, scale, logged, state.selection_hint)
    state.selection_hint = metrics.threshold
    state.steps_since_fired = torch.where(metrics.fired, 0, state.steps_since_fired + 1)
    state.step, state.batch, state.tokens = state.step + 1, state.batch + 1, state.tokens + x.shape[0]
    if cfg.dead_revival == "resample" and state.step % cfg.resample_every == 0 and state.step < total:
        resample_dead(state, source, cfg, stop_token)
    if not logged:
        return None
    row = _row(state, metrics, lr, cfg)
    check_finite(state, row)
    state.history.append(row)
    return row


def _row(state: TrainState, m: StepMetrics, lr: float, cfg: TrainConfig) -> dict[str, float]:
    dead = state.dead_mask(cfg.dead_window).float().mean()
    measured = (m.loss, m.mse, m.sparsity, m.aux, m.l0, m.fvu)
    values = torch.stack([*(t.float() for t in measured), dead]).tolist()  # type: ignore[union-attr]
    names = ("loss", "mse", "sparsity", "aux", "l0", "fvu", "dead")
    return {"step": state.step, "tokens": state.tokens, **dict(zip(names, values, strict=True)), "lr": lr}


def check_batch(state: TrainState, batch: dict[str, Tensor], source: object = None) -> None:
    """Raise TrainingDivergedError when a batch as read (tensor name -> tensor) holds NaN or infinite values.

    A bad batch is the cache's fault (naming its files when `source` can find them): lowering the
    learning rate would not help, rebuilding the cache does."""
    bad_inputs = [name for name, tensor in batch.items() if not all_finite(tensor)]
    if bad_inputs:
        locate = getattr(source, "nonfinite_files", None)  # storage.shards.PairSource scans its shard files
        files = locate() if callable(locate) else []
        where = f" ({', '.join(files)})" if files else ""
        raise TrainingDivergedError(
            f"training diverged by step {state.step + 1}, epoch {state.epoch}: its batch of {' and '.join(bad_inputs)} "
            f"from the activation cache holds NaN or infinite values{where}, so the cache is corrupt; the last good "
            "checkpoint is kept. Rebuild the cache (circuitflow run CONFIG --force activations), then rerun"
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether every element is finite, from one sum (a NaN or an infinity makes it non-finite); the
    element-wise check runs only when the sum is not finite, which an overflow alone can also cause."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(
    state: TrainState,
    row: dict[str, float] | None = None,
    batch: dict[str, Tensor] | None = None,
    source: object = None,
) -> None:
    """Raise TrainingDivergedError when the next batch (see check_batch), the logged loss or any weight
    is NaN or infinite."""
    check_batch(state, batch or {}, source)
    bad_loss = row is not None and not math.isfinite(row["loss"])
    bad_weights = not bool(torch.stack([torch.isfinite(p).all() for p in state.transcoder.parameters()]).all())
    if bad_loss or bad_weights:
        what = f"loss {row['loss']}" if bad_loss and row else "non-finite weights"
        raise TrainingDivergedError(
            f"training diverged ({what}) by step {state.step}, epoch {state.epoch}; the last good checkpoint "
            "is kept. Lower train.lr or raise train.warmup_steps (lr_schedule: warmup) and rerun"
        )

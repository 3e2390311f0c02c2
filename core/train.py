"""Transcoder training (ALGORITHMS.md section 2): a pure `train_step` and a short `fit` loop.

`fit` draws shuffled (mlp_in, mlp_out) batches from a pair source (storage.shards or a streaming
source), runs Adam with a learning-rate schedule, tracks dead features and revives them, and hands
its whole `TrainState` to callbacks (checkpoints, logging). Resuming from a state reproduces an
uninterrupted run: data order depends only on (seed, epoch) and resampling only on (seed, step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from core.config import TrainConfig
from core.errors import UserError
from core.transcoder import Transcoder, TranscoderConfig, init_transcoder

SAMPLE_BLOCK = 1024
"""Contiguous tokens per random block when sampling pairs for initialisation and resampling."""
GHOST_SCALE = 0.5
"""Ghost-grad outputs are scaled to this fraction of the residual's norm (Anthropic's choice)."""
RESAMPLE_ENCODER_SCALE = 0.2
"""Resampled encoder rows get this fraction of the mean live encoder norm (Anthropic's choice)."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class PairSource(Protocol):
    """What fit reads: storage.shards.PairSource or core.activations.StreamingPairSource."""

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
        activation=cfg.activation,
        k=cfg.k,
        skip=cfg.kind == "skip_transcoder",
        hook_in=hook_in,
        hook_out=hook_out,
        layer=layer,
        model_name=model_name,
    )


def new_transcoder(cfg: TrainConfig, tc_cfg: TranscoderConfig) -> Transcoder:
    """A freshly initialised transcoder (Kaiming-uniform, unit decoder rows, jumprelu threshold set)."""
    tc = init_transcoder(tc_cfg, seed=cfg.seed)
    if tc.threshold is not None:
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


# ---------------------------------------------------------------- JumpReLU straight-through estimators


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((pre - threshold) / bandwidth) / bandwidth."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - threshold); d/dpre = H, d/dthreshold = -threshold * K / bandwidth."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(grad * threshold * _window(pre, threshold, ctx.bandwidth))
        return grad_pre, _sum_to(grad_threshold, threshold), None


class _Step(torch.autograd.Function):
    """H(pre - threshold); d/dpre = 0, d/dthreshold = -K / bandwidth (the L0 straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(grad * _window(pre, threshold, ctx.bandwidth))
        return torch.zeros_like(pre), _sum_to(grad_threshold, threshold), None


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    return grad.reshape(-1, like.shape[-1]).sum(0)


def jumprelu_ste(
    pre: Float[Tensor, "batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "batch d_sae"]:
    """JumpReLU whose threshold gets a straight-through gradient (Rajamanoharan et al. 2024)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step_ste(
    pre: Float[Tensor, "batch d_sae"], threshold: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "batch d_sae"]:
    """Heaviside step H(pre - threshold) with a straight-through gradient for the threshold (L0)."""
    return _Step.apply(pre, threshold, bandwidth)


# ---------------------------------------------------------------- the loss


class LossOutput(NamedTuple):
    """Terms of the training loss for one batch (scalars keep their graph)."""

    loss: Tensor
    """Total: mse + coefficient * sparsity + aux."""
    mse: Tensor
    """Mean over elements of (y_hat - y)^2."""
    sparsity: Tensor
    """Uncoefficiented penalty: decoder-norm-weighted L1 (relu), L0 (jumprelu), 0 (topk)."""
    aux: Tensor
    """Dead-feature term: TopK auxiliary loss or ghost-grad loss (0 when unused)."""
    out: Float[Tensor, "batch d_out"]
    """Reconstruction y_hat."""
    feature_acts: Float[Tensor, "batch d_sae"]
    """Feature activations z."""


def compute_loss(
    tc: Transcoder,
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    cfg: TrainConfig,
    dead: Bool[Tensor, " d_sae"] | None = None,
    sparsity_scale: float = 1.0,
) -> LossOutput:
    """The loss of ALGORITHMS.md section 2 for one batch; `dead` marks features to revive (aux terms)."""
    pre = tc.pre_acts(x)  # [batch, d_sae]
    if tc.threshold is not None:
        z = jumprelu_ste(pre, tc.threshold, cfg.jumprelu_bandwidth)
    else:
        z = tc.activate(pre)
    out = tc.decode(z, x).float()  # [batch, d_out]
    mse = (out - y).pow(2).mean()
    if cfg.activation == "relu":
        sparsity = (z.float() * tc.W_dec.norm(dim=-1)).sum(-1).mean()
        coefficient = cfg.l1_coefficient
    elif cfg.activation == "jumprelu":
        sparsity = step_ste(pre, tc.threshold, cfg.jumprelu_bandwidth).float().sum(-1).mean()
        coefficient = cfg.l0_coefficient
    else:
        sparsity, coefficient = mse.new_zeros(()), 0.0
    aux = _dead_feature_loss(tc, pre, y - out.detach(), mse, cfg, dead)
    loss = mse + coefficient * sparsity_scale * sparsity + aux
    return LossOutput(loss, mse, sparsity, aux, out, z)


def _dead_feature_loss(
    tc: Transcoder, pre: Tensor, residual: Tensor, mse: Tensor, cfg: TrainConfig, dead: Tensor | None
) -> Tensor:
    if dead is None or not bool(dead.any()):
        return mse.new_zeros(())
    if cfg.activation == "topk" and cfg.aux_k_coefficient > 0:
        return cfg.aux_k_coefficient * aux_k_loss(tc, pre, residual, dead)
    if cfg.dead_revival == "ghost_grads":
        return ghost_grad_loss(tc, pre, residual, mse, dead)
    return mse.new_zeros(())


def aux_k_loss(
    tc: Transcoder,
    pre: Float[Tensor, "batch d_sae"],
    residual: Float[Tensor, "batch d_out"],
    dead: Bool[Tensor, " d_sae"],
) -> Tensor:
    """TopK auxiliary loss (Gao et al. 2024): the top dead features reconstruct the residual y - y_hat."""
    k_aux = min(tc.cfg.d_out // 2, int(dead.sum()))
    masked = pre.masked_fill(~dead, -torch.inf)  # [batch, d_sae]
    values, indices = masked.topk(k_aux, dim=-1)  # [batch, k_aux]
    z_aux = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    recon = (z_aux @ tc.W_dec).float()  # [batch, d_out]
    return (recon - residual.detach()).pow(2).mean()


def ghost_grad_loss(
    tc: Transcoder,
    pre: Float[Tensor, "batch d_sae"],
    residual: Float[Tensor, "batch d_out"],
    mse: Tensor,
    dead: Bool[Tensor, " d_sae"],
) -> Tensor:
    """Ghost grads (Anthropic, Feb 2024): dead features, exp-activated, fit the residual y - y_hat.

    The residual is against the target y (the original transcoder code used the input). The ghost
    output is scaled to half the residual norm per token, and the loss is rescaled to the size of the
    reconstruction loss, so it only steers dead features towards what the live ones miss.
    """
    residual = residual.detach().float()
    ghost = torch.exp(pre[:, dead].float()) @ tc.W_dec[dead].float()  # [batch, d_out]
    scale = residual.norm(dim=-1, keepdim=True) / (ghost.norm(dim=-1, keepdim=True) / GHOST_SCALE + 1e-6)
    ghost = ghost * scale.detach()
    per_token = (ghost - residual).pow(2).sum(-1) / residual.norm(dim=-1).clamp_min(1e-6)
    raw = per_token.mean()
    return raw * (mse / (raw + 1e-6)).detach()


# ---------------------------------------------------------------- one optimiser step


class StepMetrics(NamedTuple):
    """What one step measured (device tensors; nothing is synchronised)."""

    loss: Tensor
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    l0: Tensor
    """Mean non-zero features per token."""
    fvu: Tensor
    """sum (y_hat - y)^2 / sum (y - mean y)^2 over the batch."""
    fired: Bool[Tensor, " d_sae"]
    """Features that fired on at least one token of the batch."""


@torch.no_grad()
def remove_parallel_grad(tc: Transcoder) -> None:
    """Project out the gradient component along each (unit) decoder row, so Adam cannot grow norms."""
    if tc.W_dec.grad is None:
        return
    rows = tc.W_dec / tc.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [d_sae, d_out]
    tc.W_dec.grad -= (tc.W_dec.grad * rows).sum(-1, keepdim=True) * rows


def train_step(
    tc: Transcoder,
    optimizer: torch.optim.Optimizer,
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    cfg: TrainConfig,
    lr: float,
    dead: Bool[Tensor, " d_sae"] | None = None,
    sparsity_scale: float = 1.0,
) -> StepMetrics:
    """One Adam step on one batch at learning rate `lr`: loss, backward, decoder constraint, update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.autocast_bf16):
        terms = compute_loss(tc, x, y, cfg, dead, sparsity_scale)
    terms.loss.backward()
    if cfg.normalize_decoder:
        remove_parallel_grad(tc)
    optimizer.step()
    if cfg.normalize_decoder:
        tc.normalize_decoder()
    if tc.threshold is not None:
        with torch.no_grad():
            tc.threshold.clamp_(min=0.0)
    with torch.no_grad():
        active = terms.feature_acts != 0  # [batch, d_sae]
        fvu = (terms.out - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        return StepMetrics(
            terms.loss.detach(), terms.mse.detach(), terms.sparsity.detach(), terms.aux.detach(),
            active.sum(-1).float().mean(), fvu, active.any(0),
        )  # fmt: skip


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


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data: weights, Adam, dead tracking, position."""

    transcoder: Transcoder
    optimizer: torch.optim.Adam
    steps_since_fired: Int[Tensor, " d_sae"]
    """Optimiser steps since each feature last fired."""
    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Current epoch."""
    batch: int = 0
    """Next batch index within the current epoch."""
    tokens: int = 0
    """Training tokens consumed."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Logged metric rows (step, tokens, loss, mse, sparsity, l0, fvu, dead, lr, aux)."""

    def dead_mask(self, window: int) -> Bool[Tensor, " d_sae"]:
        return self.steps_since_fired >= window


def new_state(tc: Transcoder, cfg: TrainConfig) -> TrainState:
    """A fresh Adam optimiser and dead-feature counters for `tc`."""
    optimizer = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    counters = torch.zeros(tc.cfg.d_sae, dtype=torch.int64, device=tc.device)
    return TrainState(tc, optimizer, counters)


def state_tensors(state: TrainState) -> dict[str, Tensor]:
    """Every tensor of a state, flat and named (weights, Adam moments and steps, dead counters)."""
    tensors = {f"param.{name}": p.detach() for name, p in state.transcoder.named_parameters()}
    names = [name for name, _ in state.transcoder.named_parameters()]
    for index, moments in state.optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            tensors[f"adam.{names[index]}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
    tensors["steps_since_fired"] = state.steps_since_fired
    return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # a snapshot, not views


def state_meta(state: TrainState) -> dict[str, Any]:
    """The JSON-able part of a state: position and logged history."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "tokens": state.tokens,
        "history": [dict(row) for row in state.history],
    }


def restore_state(tc: Transcoder, cfg: TrainConfig, tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
    """Rebuild a TrainState from `state_tensors` / `state_meta` output (weights loaded into `tc`)."""
    with torch.no_grad():
        for name, p in tc.named_parameters():
            p.copy_(tensors[f"param.{name}"])
    state = new_state(tc, cfg)
    names = [name for name, _ in tc.named_parameters()]
    saved = state.optimizer.state_dict()
    for index, name in enumerate(names):
        if f"adam.{name}.exp_avg" in tensors:
            saved["state"][index] = {
                "step": tensors[f"adam.{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].to(tc.device),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(tc.device),
            }
    state.optimizer.load_state_dict(saved)
    state.steps_since_fired.copy_(tensors["steps_since_fired"])
    state.step, state.epoch, state.batch, state.tokens = meta["step"], meta["epoch"], meta["batch"], meta["tokens"]
    state.history = list(meta["history"])
    return state


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
    """One step of fit: train, update counters and position, resample, log."""
    check_finite(state, batch={"mlp_in": x_in, "mlp_out": x_out}, source=source)  # before it can reach the weights
    tc = state.transcoder
    x, y = (t.to(tc.device, non_blocking=True) for t in select_pair(cfg.kind, x_in, x_out))
    lr = cfg.lr * lr_factor(state.step, total, cfg)
    revive = cfg.activation == "topk" or cfg.dead_revival == "ghost_grads"
    dead = state.dead_mask(cfg.dead_window) if revive else None
    metrics = train_step(tc, state.optimizer, x, y, cfg, lr, dead, sparsity_factor(state.step, cfg))
    state.steps_since_fired = torch.where(metrics.fired, 0, state.steps_since_fired + 1)
    state.step, state.batch, state.tokens = state.step + 1, state.batch + 1, state.tokens + x.shape[0]
    if cfg.dead_revival == "resample" and state.step % cfg.resample_every == 0 and state.step < total:
        resample_dead(state, source, cfg, stop_token)
    if state.step % cfg.log_every and state.step != total:
        return None
    row = _row(state, metrics, lr, cfg)
    check_finite(state, row)
    state.history.append(row)
    return row


def _row(state: TrainState, m: StepMetrics, lr: float, cfg: TrainConfig) -> dict[str, float]:
    dead = state.dead_mask(cfg.dead_window).float().mean()
    values = torch.stack([m.loss, m.mse, m.sparsity, m.aux, m.l0, m.fvu, dead]).tolist()
    names = ("loss", "mse", "sparsity", "aux", "l0", "fvu", "dead")
    return {"step": state.step, "tokens": state.tokens, **dict(zip(names, values, strict=True)), "lr": lr}


def check_finite(
    state: TrainState,
    row: dict[str, float] | None = None,
    batch: dict[str, Tensor] | None = None,
    source: object = None,
) -> None:
    """Raise TrainingDivergedError when the next batch (tensor name -> tensor, checked before the step that
    reads it), the logged loss or any weight is NaN or infinite. A bad batch is the cache's fault (naming its
    files when `source` can find them): lowering the learning rate would not help, rebuilding the cache does."""
    bad_inputs = [name for name, tensor in (batch or {}).items() if not bool(torch.isfinite(tensor).all())]
    if bad_inputs:
        locate = getattr(source, "nonfinite_files", None)  # storage.shards.PairSource scans its shard files
        files = locate() if callable(locate) else []
        where = f" ({', '.join(files)})" if files else ""
        raise TrainingDivergedError(
            f"training diverged by step {state.step + 1}, epoch {state.epoch}: its batch of {' and '.join(bad_inputs)} "
            f"from the activation cache holds NaN or infinite values{where}, so the cache is corrupt; the last good "
            "checkpoint is kept. Rebuild the cache (circuitflow run CONFIG --force activations), then rerun"
        )
    bad_loss = row is not None and not math.isfinite(row["loss"])
    bad_weights = not all(bool(torch.isfinite(p).all()) for p in state.transcoder.parameters())
    if bad_loss or bad_weights:
        what = f"loss {row['loss']}" if bad_loss and row else "non-finite weights"
        raise TrainingDivergedError(
            f"training diverged ({what}) by step {state.step}, epoch {state.epoch}; the last good checkpoint "
            "is kept. Lower train.lr or raise train.warmup_steps (lr_schedule: warmup) and rerun"
        )

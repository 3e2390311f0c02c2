"""One optimiser step: the hand-written forward/backward of each activation, and the autograd reference.

`train_step` computes the loss gradients of core.losses by hand: exactly the five matmuls of the
step (encoder and decoder forward, decoder weight grad, grad of the activations, encoder weight
grad; the input pre-bias gradient is a matrix-vector product), with the activation function's
backward done in place on the activation gradient, no per-step host synchronisation (but batch
top-k's selection, whose size depends on the data) and no metrics unless asked for. TopK and batch top-k use their sparsity where core.topk says it pays on
the device; batch top-k also moves the transcoder's JumpReLU threshold towards the batch's
selection threshold, so that the saved transcoder computes the code it was trained with.
The dead-feature terms (TopK auxiliary loss, ghost grads) are added by autograd on top when any
feature is dead. `reference_step` is the autograd formulation the hand-written steps are tested
against; it also runs the bfloat16-autocast configuration.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from core import topk
from core.config import TOPK_ACTIVATIONS, TrainConfig
from core.losses import compute_loss, dead_feature_loss
from core.transcoder import Transcoder

HAND_DTYPES = (torch.float32, torch.float64)
"""Weight dtypes the hand-written steps run in (others take the autograd reference)."""
THRESHOLD_RATE = 0.01
"""Batch top-k: each step moves the JumpReLU threshold this fraction of the way to the batch's
selection threshold (an exponential moving average over about 1 / THRESHOLD_RATE steps)."""


class StepMetrics(NamedTuple):
    """What one step measured (device tensors; nothing is synchronised). Only `fired` is always
    there; the scalars are None when the step was run with measure=False."""

    fired: Bool[Tensor, " d_sae"]
    """Features that fired on at least one token of the batch."""
    loss: Tensor | None = None
    mse: Tensor | None = None
    sparsity: Tensor | None = None
    aux: Tensor | None = None
    l0: Tensor | None = None
    """Mean non-zero features per token."""
    fvu: Tensor | None = None
    """sum (y_hat - y)^2 / sum (y - mean y)^2 over the batch."""
    threshold: Tensor | None = None
    """Batch top-k: the smallest activation the batch kept, infinite if none (always there for batch top-k)."""


class HandPass(NamedTuple):
    """What a hand-written pass leaves besides the gradients it wrote into the weights' .grad."""

    diff: Float[Tensor, "batch d_out"]
    """y_hat - y."""
    fired: Bool[Tensor, " d_sae"]
    sparsity: Tensor | None
    """The uncoefficiented penalty (only when measured)."""
    l0: Tensor | None
    """Mean active features per token (only when measured)."""
    threshold: Tensor | None = None
    """Batch top-k: the smallest activation kept."""


@torch.no_grad()
def remove_parallel_grad(tc: Transcoder) -> None:
    """Project out the gradient component along each (unit) decoder row, so Adam cannot grow norms."""
    if tc.W_dec.grad is None:
        return
    norms_sq = tc.W_dec.pow(2).sum(-1).clamp_min(1e-24)  # [d_sae]
    along = torch.linalg.vecdot(tc.W_dec.grad, tc.W_dec) / norms_sq  # [d_sae]
    tc.W_dec.grad.addcmul_(tc.W_dec, along[:, None], value=-1.0)


def hand_written(tc: Transcoder, cfg: TrainConfig) -> bool:
    """Whether train_step computes this configuration's gradients by hand (else the autograd reference)."""
    return not cfg.autocast_bf16 and tc.dtype in HAND_DTYPES


def train_step(
    tc: Transcoder,
    optimizer: torch.optim.Optimizer,
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    cfg: TrainConfig,
    lr: float,
    dead: Bool[Tensor, " d_sae"] | None = None,
    sparsity_scale: float = 1.0,
    measure: bool = True,
    hint: Tensor | None = None,
) -> StepMetrics:
    """One Adam step on one batch at learning rate `lr`: gradients, decoder constraint, update.

    `dead` marks features the dead-feature term should revive; `measure` computes the metrics; `hint`,
    the last batch top-k step's threshold, only speeds up its selection."""
    if not hand_written(tc, cfg):
        return reference_step(tc, optimizer, x, y, cfg, lr, dead, sparsity_scale)
    for group in optimizer.param_groups:
        group["lr"] = lr
    hand = hand_pass(tc, x, y, cfg, sparsity_scale, measure, hint)
    mse = hand.diff.pow(2).mean() if measure or dead is not None else None
    aux = _dead_feature_grads(tc, x, hand.diff, mse, cfg, dead)
    _constrain_and_update(tc, optimizer, cfg, hand.threshold)
    if not measure:
        return StepMetrics(hand.fired, threshold=hand.threshold)
    coefficient = {"relu": cfg.l1_coefficient, "jumprelu": cfg.l0_coefficient}.get(cfg.activation, 0.0)
    loss = mse + coefficient * sparsity_scale * hand.sparsity + aux
    return StepMetrics(hand.fired, loss, mse, hand.sparsity, aux, hand.l0, _fvu(hand.diff, y), hand.threshold)


def reference_step(
    tc: Transcoder,
    optimizer: torch.optim.Optimizer,
    x: Float[Tensor, "batch d_in"],
    y: Float[Tensor, "batch d_out"],
    cfg: TrainConfig,
    lr: float,
    dead: Bool[Tensor, " d_sae"] | None = None,
    sparsity_scale: float = 1.0,
) -> StepMetrics:
    """train_step by autograd through core.losses.compute_loss (optionally under bfloat16 autocast)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.autocast_bf16):
        terms = compute_loss(tc, x, y, cfg, dead, sparsity_scale)
    terms.loss.backward()
    with torch.no_grad():
        active = terms.feature_acts != 0  # [batch, d_sae]
        threshold = None
        if cfg.activation == "batchtopk":  # the smallest activation kept
            threshold = terms.feature_acts.detach().masked_fill(~active, torch.inf).min()
    _constrain_and_update(tc, optimizer, cfg, threshold)
    with torch.no_grad():
        return StepMetrics(
            active.any(0), terms.loss.detach(), terms.mse.detach(), terms.sparsity.detach(), terms.aux.detach(),
            active.sum(-1).float().mean(), _fvu(terms.out - y, y), threshold,
        )  # fmt: skip


def _constrain_and_update(
    tc: Transcoder, optimizer: torch.optim.Optimizer, cfg: TrainConfig, threshold: Tensor | None = None
) -> None:
    if cfg.normalize_decoder:
        remove_parallel_grad(tc)
    optimizer.step()
    if cfg.normalize_decoder:
        tc.normalize_decoder()
    if tc.threshold is not None:
        if threshold is not None:
            track_threshold(tc.threshold, threshold)
        with torch.no_grad():
            tc.threshold.clamp_(min=0.0)


@torch.no_grad()
def track_threshold(threshold: Float[Tensor, " d_sae"], selected: Tensor) -> None:
    """Move every feature's threshold THRESHOLD_RATE of the way to the smallest activation the batch kept
    (infinite when it kept none: no move); a zero (fresh) threshold takes the batch's at once. Without
    a host synchronisation."""
    selected = selected.to(threshold.dtype).expand_as(threshold)
    moved = torch.where(threshold > 0, threshold.lerp(selected, THRESHOLD_RATE), selected)
    threshold.copy_(torch.where(torch.isfinite(selected), moved, threshold))


@torch.no_grad()
def _fvu(diff: Float[Tensor, "batch d_out"], y: Float[Tensor, "batch d_out"]) -> Tensor:
    return diff.float().pow(2).sum() / (y.float() - y.float().mean(0)).pow(2).sum().clamp_min(1e-12)


def _dead_feature_grads(
    tc: Transcoder, x: Tensor, diff: Tensor, mse: Tensor | None, cfg: TrainConfig, dead: Tensor | None
) -> Tensor:
    """Add the dead-feature term's gradients (autograd through a fresh encoder pass) when any feature is dead."""
    if dead is None or mse is None or not bool(dead.any()):
        return diff.new_zeros(())
    with torch.enable_grad():
        aux = dead_feature_loss(tc, tc.pre_acts(x), -diff, mse, cfg, dead)
        if aux.requires_grad:
            aux.backward()
    return aux.detach()


# ---------------------------------------------------------------- the hand-written passes


@torch.no_grad()
def hand_pass(
    tc: Transcoder,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    sparsity_scale: float,
    measure: bool,
    hint: Tensor | None = None,
) -> HandPass:
    """Forward and backward of the loss without autograd: writes every weight's .grad (the loss of
    core.losses.compute_loss without the dead-feature term) and returns what the metrics need."""
    xc = x - tc.b_dec  # [batch, d_in]
    pre = torch.addmm(tc.b_enc, xc, tc.W_enc)  # [batch, d_sae]
    if cfg.activation == "jumprelu":
        return _jumprelu_pass(tc, x, xc, pre, y, cfg, sparsity_scale, measure)
    if cfg.activation in TOPK_ACTIVATIONS:
        return _topk_pass(tc, x, xc, pre, y, cfg, measure, hint)
    coefficient = cfg.l1_coefficient * sparsity_scale
    return _relu_pass(tc, x, xc, pre.relu_(), y, coefficient, cfg.normalize_decoder, measure)


def _relu_pass(
    tc: Transcoder, x: Tensor, xc: Tensor, z: Tensor, y: Tensor, l1: float, normalized: bool, measure: bool
) -> HandPass:
    """z >= 0 is relu(pre) (or a dense TopK code); `l1` weights the decoder-norm-weighted L1 term."""
    diff, g_out = output_grads(tc, x, z, y)
    norms = tc.W_dec.norm(dim=-1)  # [d_sae]
    g_z = torch.addmm(norms * (l1 / x.shape[0]), g_out, tc.W_dec.T)  # [batch, d_sae]
    g_pre = torch.ops.aten.threshold_backward.grad_input(g_z, z, 0.0, grad_input=g_z)  # zero where z <= 0
    tc.W_dec.grad = z.T @ g_out  # [d_sae, d_out]
    if l1 and not normalized:  # the norms' own gradient; parallel to the rows, so the constraint removes it
        tc.W_dec.grad += (z.sum(0) * (l1 / x.shape[0]) / norms)[:, None] * tc.W_dec
    encoder_grads(tc, xc, g_pre)
    sparsity = (z @ norms).mean() if measure else None
    l0 = (z > 0).sum(-1).to(z.dtype).mean() if measure else None
    return HandPass(diff, column_sums(z, g_z.new_ones(x.shape[0])) > 0, sparsity, l0)  # z >= 0


def _topk_pass(
    tc: Transcoder,
    x: Float[Tensor, "batch d_in"],
    xc: Float[Tensor, "batch d_in"],
    pre: Float[Tensor, "batch d_sae"],
    y: Float[Tensor, "batch d_out"],
    cfg: TrainConfig,
    measure: bool,
    hint: Tensor | None,
) -> HandPass:
    """TopK (each token's k largest pre-activations) or batch top-k (the batch's k * batch largest, the
    selection screened by `hint`, else by the threshold, which lags the batches by its average): on the
    active pairs where core.topk says that pays, else on the dense code. No sparsity term, unit decoder
    rows; batch top-k also returns the smallest value it kept (infinite when it kept none)."""
    kept = None
    if cfg.activation == "topk":
        pairs = topk.per_token(pre, cfg.k)
    else:
        assert tc.threshold is not None
        pairs = topk.per_batch(pre, cfg.k, tc.threshold.max() if hint is None else hint)
        kept = torch.cat([pairs.vals, pairs.vals.new_full((1,), torch.inf)]).min()
    if topk.use_sparse(pre, cfg.k):
        return _sparse_pass(tc, x, xc, pairs, y, measure)._replace(threshold=kept)
    hand = _relu_pass(tc, x, xc, topk.dense(pairs), y, 0.0, normalized=True, measure=measure)
    return hand._replace(sparsity=hand.diff.new_zeros(()) if measure else None, threshold=kept)


def _sparse_pass(
    tc: Transcoder,
    x: Float[Tensor, "batch d_in"],
    xc: Float[Tensor, "batch d_in"],
    pairs: topk.Pairs,
    y: Float[Tensor, "batch d_out"],
    measure: bool,
) -> HandPass:
    """The TopK loss's forward and backward on the active pairs (core.topk); writes every weight's .grad."""
    acts = pairs.vals  # [nnz]
    out = topk.decode(pairs, tc.W_dec).add_(tc.b_dec_out)
    diff, g_out = finish_output(tc, x, out, y)
    g_acts = topk.active_grads(pairs, g_out, tc.W_dec).mul_(acts > 0)  # relu: no gradient below 0
    by_feature = topk.FeatureMajor(pairs)
    tc.W_dec.grad = by_feature.matmul(acts, g_out)  # [d_sae, d_out]
    tc.W_enc.grad = by_feature.matmul(g_acts, xc).T.contiguous()  # [d_in, d_sae]
    tc.b_enc.grad = by_feature.sum(g_acts)
    tc.b_dec.grad = -(tc.W_enc @ tc.b_enc.grad)
    fired = by_feature.sum((acts > 0).to(acts.dtype)) > 0
    l0 = (acts > 0).sum().to(acts.dtype) / x.shape[0] if measure else None
    return HandPass(diff, fired, diff.new_zeros(()) if measure else None, l0)


def _jumprelu_pass(
    tc: Transcoder, x: Tensor, xc: Tensor, pre: Tensor, y: Tensor, cfg: TrainConfig, scale: float, measure: bool
) -> HandPass:
    """z = pre * H(pre - threshold); the threshold's gradient through the rectangle-kernel estimators."""
    threshold, bandwidth = tc.threshold, cfg.jumprelu_bandwidth
    assert threshold is not None
    gap = pre - threshold  # [batch, d_sae]
    above = torch.gt(gap, 0.0, out=torch.empty_like(gap))  # H(pre - threshold) as a float: cheaper than masking
    window = gap.abs_().lt_(bandwidth / 2)  # 1.0 inside the kernel's support
    z = pre.mul_(above)
    diff, g_out = output_grads(tc, x, z, y)
    g_z = g_out @ tc.W_dec.T  # [batch, d_sae]
    ones = g_z.new_ones(x.shape[0])
    in_window = column_sums(window, ones)  # [d_sae]
    l0_weight = cfg.l0_coefficient * scale / x.shape[0]
    threshold.grad = -(threshold * column_sums(window.mul_(g_z), ones) + l0_weight * in_window) / bandwidth
    tc.W_dec.grad = z.T @ g_out
    encoder_grads(tc, xc, g_z.mul_(above))
    l0 = above.sum(-1).mean() if measure else None
    return HandPass(diff, above.amax(0) > 0, l0, l0)


def output_grads(
    tc: Transcoder, x: Tensor, z: Float[Tensor, "batch d_sae"], y: Tensor
) -> tuple[Float[Tensor, "batch d_out"], Float[Tensor, "batch d_out"]]:
    """Decode dense z; (y_hat - y, d mse / d y_hat); the output-side bias and skip gradients."""
    out = torch.addmm(tc.b_dec_out, z, tc.W_dec)  # [batch, d_out]
    return finish_output(tc, x, out, y)


def finish_output(tc: Transcoder, x: Tensor, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Add the skip path to a decoded `out`; (y_hat - y, d mse / d y_hat) and the output-side grads."""
    if tc.W_skip is not None:
        out.addmm_(x, tc.W_skip)
    diff = out.sub_(y)
    g_out = diff * (2.0 / diff.numel())
    tc.b_dec_out.grad = g_out.sum(0)
    if tc.W_skip is not None:
        tc.W_skip.grad = x.T @ g_out
    return diff, g_out


def encoder_grads(tc: Transcoder, xc: Tensor, g_pre: Float[Tensor, "batch d_sae"]) -> None:
    """W_enc, b_enc and b_dec gradients from the pre-activation gradient (dense)."""
    tc.W_enc.grad = xc.T @ g_pre  # [d_in, d_sae]
    tc.b_enc.grad = column_sums(g_pre, g_pre.new_ones(g_pre.shape[0]))
    tc.b_dec.grad = -(tc.W_enc @ tc.b_enc.grad)  # pre = (x - b_dec) W_enc + b_enc


def column_sums(matrix: Float[Tensor, "rows cols"], ones: Float[Tensor, " rows"]) -> Float[Tensor, " cols"]:
    """matrix.sum(0) as a matrix-vector product (faster than the reduction on CPU)."""
    return torch.mv(matrix.T, ones)

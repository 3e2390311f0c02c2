"""The training loss of docs/method.md section 2 in its autograd (reference) formulation.

The JumpReLU straight-through estimators, the per-kind sparsity penalties and the dead-feature terms
(TopK auxiliary loss, ghost grads). core.train_steps computes the same gradients by hand for speed;
this formulation stays the reference the hand-written steps are tested against.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from core.config import TOPK_ACTIVATIONS, TrainConfig
from core.transcoder import Transcoder

GHOST_SCALE = 0.5
"""Ghost-grad outputs are scaled to this fraction of the residual's norm (Anthropic's choice)."""


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
    """Uncoefficiented penalty: decoder-norm-weighted L1 (relu), L0 (jumprelu), 0 (topk, batchtopk)."""
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
    """The loss of docs/method.md section 2 for one batch; `dead` marks features to revive (aux terms)."""
    pre = tc.pre_acts(x)  # [batch, d_sae]
    if cfg.activation == "jumprelu":
        z = jumprelu_ste(pre, tc.threshold, cfg.jumprelu_bandwidth)
    elif cfg.activation == "batchtopk":
        z = batch_topk_relu(pre, cfg.k)
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
    aux = dead_feature_loss(tc, pre, y - out.detach(), mse, cfg, dead)
    loss = mse + coefficient * sparsity_scale * sparsity + aux
    return LossOutput(loss, mse, sparsity, aux, out, z)


def dead_feature_loss(
    tc: Transcoder, pre: Tensor, residual: Tensor, mse: Tensor, cfg: TrainConfig, dead: Tensor | None
) -> Tensor:
    if dead is None or not bool(dead.any()):
        return mse.new_zeros(())
    if cfg.activation in TOPK_ACTIVATIONS and cfg.aux_k_coefficient > 0:
        return cfg.aux_k_coefficient * aux_k_loss(tc, pre, residual, dead)
    if cfg.dead_revival == "ghost_grads":
        return ghost_grad_loss(tc, pre, residual, mse, dead)
    return mse.new_zeros(())


def batch_topk_relu(pre: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """Batch top-k (Bussmann et al. 2024): keep the k * batch largest positive pre-activations of the batch
    (with every value tied with the (k * batch)-th)."""
    flat = pre.detach().reshape(-1)
    kth = flat.topk(min(k * pre.shape[0], flat.numel())).values[-1]
    return pre * ((pre >= kth) & (pre > 0))


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

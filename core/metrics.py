"""Transcoder evaluation (docs/method.md section 3): sparsity and fidelity on held-out pairs, and
cross-entropy with transcoders spliced into the model in place of the MLP outputs they predict."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from core.train import PairSource, select_pair
from core.transcoder import TranscoderConfig, TranscoderOutput

DENSE_THRESHOLD = 0.1
"""A feature firing on more than this fraction of tokens counts as dense."""
LIVE_LOG10_DENSITY = -4.0
"""A feature whose log10 firing frequency is above this counts as live (the original's cut)."""
DENSITY_BINS = np.linspace(-10.0, 0.0, 41)
"""Edges of the log10 density histogram; densities are floored at 1e-10 as in the original."""


class Replacement(Protocol):
    """What the splice needs from a transcoder: its hooks and a forward returning `.out`."""

    cfg: TranscoderConfig

    def __call__(self, u: Tensor) -> TranscoderOutput: ...


# ---------------------------------------------------------------- per-batch measures


def l0(feature_acts: Float[Tensor, "batch d_sae"]) -> float:
    """Mean number of non-zero features per token."""
    return float((feature_acts != 0).sum(-1).float().mean())


def fvu(out: Float[Tensor, "batch d_out"], target: Float[Tensor, "batch d_out"]) -> float:
    """Fraction of variance unexplained: sum (out - y)^2 / sum (y - mean y)^2 (float64)."""
    out, target = out.double(), target.double()
    return float((out - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


def log10_density(density: Float[Tensor, " d_sae"]) -> np.ndarray:
    """log10 firing frequency per feature, floored at 1e-10 (the original's log_feature_sparsity)."""
    return np.log10(density.double().cpu().numpy() + 1e-10)


def density_histogram(density: Float[Tensor, " d_sae"]) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the log10 density over DENSITY_BINS."""
    values = np.clip(log10_density(density), DENSITY_BINS[0], DENSITY_BINS[-1])  # density 1 gives log10 > 0
    return np.histogram(values, bins=DENSITY_BINS)


# ---------------------------------------------------------------- held-out pairs


class PairEval(NamedTuple):
    """Sparsity and fidelity of a transcoder on a span of held-out pairs."""

    n_tokens: int
    fvu: float
    """Against the target (the MLP output for transcoders)."""
    mse: float
    """Mean over elements of (y_hat - y)^2."""
    l0: float
    dead_fraction: float
    """Features that never fired on the span."""
    dense_fraction: float
    """Features firing on more than DENSE_THRESHOLD of the tokens."""
    live_fraction: float
    """Features with log10 density above LIVE_LOG10_DENSITY."""
    density: Tensor
    """Firing frequency per feature [d_sae] (float64, cpu)."""


@torch.no_grad()
def evaluate_pairs(
    tc: nn.Module, source: PairSource, start: int, stop: int, kind: str = "transcoder", batch_size: int = 4096
) -> PairEval:
    """FVU, MSE, L0 and feature densities over tokens [start, stop) of `source`, in float64 sums."""
    if stop <= start:
        raise ValueError(f"evaluate_pairs: empty span [{start}, {stop}); hold out at least one token row")
    d_sae = tc.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.float64)
    sse = l0_sum = 0.0
    y_sum = y_sq = None
    for lo in range(start, stop, batch_size):
        x, y = select_pair(kind, *source.read(lo, min(stop, lo + batch_size)))
        x, y = x.to(tc.W_enc.device, tc.W_enc.dtype), y.double()
        result = tc(x)
        active = result.feature_acts != 0  # [batch, d_sae]
        fired += active.sum(0).double().cpu()
        l0_sum += float(active.sum())
        sse += float((result.out.double().cpu() - y).pow(2).sum())
        y_sum = y.sum(0) if y_sum is None else y_sum + y.sum(0)
        y_sq = y.pow(2).sum(0) if y_sq is None else y_sq + y.pow(2).sum(0)
    n = stop - start
    sst = float((y_sq - y_sum.pow(2) / n).sum())
    density = fired / n
    return PairEval(
        n_tokens=n,
        fvu=sse / sst,
        mse=sse / (n * y_sum.numel()),
        l0=l0_sum / n,
        dead_fraction=float((fired == 0).double().mean()),
        dense_fraction=float((density > DENSE_THRESHOLD).double().mean()),
        live_fraction=float((log10_density(density) > LIVE_LOG10_DENSITY).mean()),
        density=density,
    )


# ---------------------------------------------------------------- spliced cross-entropy


class SpliceEval(NamedTuple):
    """Next-token cross-entropy (nats/token) clean, spliced and zero-ablated, over the same tokens."""

    ce_clean: float
    ce_spliced: float
    """Every given transcoder's output replaces its MLP output at once."""
    ce_zero: float
    """The same MLP outputs replaced by zeros."""
    ce_recovered: float
    """(ce_zero - ce_spliced) / (ce_zero - ce_clean)."""
    kl: float
    """Mean KL(clean || spliced) of the next-token distributions."""
    n_tokens: int
    """Predicted tokens averaged over."""


def splice_hooks(
    transcoders: Mapping[int, Replacement], first_pos: int = 0, zero: bool = False
) -> list[tuple[str, Callable]]:
    """Forward hooks that replace each transcoder's output hook (the MLP output) with its
    reconstruction from the real input read at its input hook, or with zeros; positions before
    `first_pos` keep their clean values."""
    hooks: list[tuple[str, Callable]] = []
    for tc in transcoders.values():
        inputs: dict[str, Tensor] = {}
        hook_in, hook_out = tc.cfg.hook_in, tc.cfg.hook_out
        if not zero and hook_in != hook_out:
            hooks.append((hook_in, _recorder(inputs)))
        hooks.append((hook_out, _replacer(tc, inputs, hook_in != hook_out, first_pos, zero)))
    return hooks


def _recorder(inputs: dict[str, Tensor]) -> Callable:
    def record(act: Tensor, hook: object) -> None:
        inputs["u"] = act

    return record


def _replacer(tc: Replacement, inputs: dict[str, Tensor], separate_input: bool, first_pos: int, zero: bool) -> Callable:
    def replace(act: Float[Tensor, "batch pos d"], hook: object) -> Tensor:
        new = act.clone()
        if zero:
            new[:, first_pos:] = 0.0
            return new
        u = inputs.pop("u") if separate_input else act  # [batch, pos, d_in]
        weight = next(iter(tc.parameters()), None) if isinstance(tc, nn.Module) else None
        u = u.to(weight.dtype) if weight is not None else u
        new[:, first_pos:] = tc(u).out[:, first_pos:].to(act.dtype)
        return new

    return replace


def _log_probs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hooks: list[tuple[str, Callable]], first_pos: int
) -> Float[Tensor, "batch pos_pred d_vocab"]:
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)  # [batch, pos, d_vocab]
    return torch.log_softmax(logits[:, first_pos:-1].double(), dim=-1)


@torch.inference_mode()
def clean_log_probs(
    model: HookedTransformer, tokens: Int[Tensor, "row pos"], batch_rows: int = 8, first_pos: int = 0
) -> list[Float[Tensor, "batch pos_pred d_vocab"]]:
    """The clean model's next-token log-probabilities (float64) of each batch of `batch_rows` rows, as
    splice_eval computes them: pass them as its `clean` to score several splices of the same rows
    with one clean forward pass."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    return [
        _log_probs(model, tokens[lo : lo + batch_rows].to(model.cfg.device), [], first_pos)
        for lo in range(0, tokens.shape[0], batch_rows)
    ]


@torch.inference_mode()
def splice_eval(
    model: HookedTransformer,
    tokens: Int[Tensor, "row pos"],
    transcoders: Mapping[int, Replacement],
    batch_rows: int = 8,
    first_pos: int = 0,
    clean: Sequence[Float[Tensor, "batch pos_pred d_vocab"]] | None = None,
) -> SpliceEval:
    """CE clean / spliced / zero-ablated, CE recovered and KL(clean || spliced) over token rows.

    All `transcoders` are spliced at once (pass one for a per-layer figure). Losses average the
    next-token predictions made at positions >= first_pos (use 1 when transcoders were trained
    without BOS: the BOS position then keeps its true MLP output in every run). `clean`: the
    clean_log_probs of the same tokens, batch_rows and first_pos (None: computed here).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if clean is not None and len(clean) != -(-tokens.shape[0] // batch_rows):
        raise ValueError(f"splice_eval: {len(clean)} clean batches for {tokens.shape[0]} rows of {batch_rows}")
    sums = torch.zeros(4, dtype=torch.float64)  # clean, spliced, zero, kl
    n = 0
    for i, lo in enumerate(range(0, tokens.shape[0], batch_rows)):
        batch = tokens[lo : lo + batch_rows].to(model.cfg.device)  # [batch, pos]
        target = batch[:, first_pos + 1 :, None]  # [batch, pos_pred, 1]
        ref = _log_probs(model, batch, [], first_pos) if clean is None else clean[i]
        spliced = _log_probs(model, batch, splice_hooks(transcoders, first_pos), first_pos)
        zeroed = _log_probs(model, batch, splice_hooks(transcoders, first_pos, zero=True), first_pos)
        for j, lp in enumerate((ref, spliced, zeroed)):
            sums[j] -= lp.gather(-1, target).sum().cpu()
        sums[3] += (ref.exp() * (ref - spliced)).sum().cpu()
        n += target.numel()
    clean_ce, spliced_ce, zero_ce, kl = (float(v) / n for v in sums)
    recovered = (zero_ce - spliced_ce) / (zero_ce - clean_ce) if zero_ce != clean_ce else float("nan")
    return SpliceEval(clean_ce, spliced_ce, zero_ce, recovered, kl, n)

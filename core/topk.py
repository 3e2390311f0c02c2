"""The TopK steps on their active (token, feature, value) triples instead of the dense [batch, d_sae] code.

Only k of d_sae features are active per token (on average, for batch top-k), so past the (dense)
encoder matmul and the selection every product can touch the active pairs alone:

    decode        y_hat = sum_j a_bj W_dec[i_bj]           embedding_bag over the pairs
    grad of a     g_bj = <g_out_b, W_dec[i_bj]>             sampled dense-dense matmul (SDDMM)
    grad W_dec    rows i: sum over its tokens a_bi g_out_b   feature-major CSR @ g_out
    grad W_enc    columns i: sum over its tokens g_bi xc_b   feature-major CSR @ xc

Measured on 2 CPU cores (bench/bench_train.py; batch 1024, d_sae 2304, k 64) each of these beats
its dense matmul by 2-4x; CUDA has the same kernels (cuSPARSE) where the gap is larger still.
Where the code is not sparse enough (k above SPARSE_MAX_DENSITY of d_sae) or the device lacks the
sparse kernels, core.train_steps uses the dense formulation.

Batch top-k keeps the k * batch largest pre-activations of the whole batch (Bussmann et al. 2024):
a token may hold more or fewer than k. Its selection screens with the last step's threshold before
the exact top-k, so the sort runs over a few candidates rather than every pre-activation.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

SPARSE_MAX_DENSITY = 1 / 8
"""Use the sparse step while k / d_sae is at most this (the default's 64 / 2304 is 1 / 36)."""
SPARSE_DEVICES = ("cpu", "cuda")
"""Devices with the CSR kernels the sparse step needs (sampled_addmm, CSR @ dense)."""
SCREEN_MARGINS = (0.8, 0.5)
"""The screens keep pre-activations above these fractions of the last threshold, tried in turn until one
keeps enough (then no screen): early in training, while the threshold moves fast, the first can keep too few."""
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Pairs(NamedTuple):
    """The active pairs of a batch in token-major order: the code as a [batch, d_sae] CSR matrix."""

    crow: Int[Tensor, " batch_plus_1"]
    """Where each token's pairs start in `cols`/`vals` (and where the last ends)."""
    cols: Int[Tensor, " nnz"]
    """Feature of each pair, ascending within a token."""
    rows: Int[Tensor, " nnz"]
    """Token of each pair."""
    vals: Float[Tensor, " nnz"]
    """Activation of each pair."""
    d_sae: int
    """Features of the dictionary (the code's width)."""

    def csr(self, values: Float[Tensor, " nnz"]) -> Tensor:
        """The [batch, d_sae] CSR matrix with this pattern and `values`."""
        shape = (self.crow.shape[0] - 1, self.d_sae)
        return torch.sparse_csr_tensor(self.crow, self.cols, values, shape, check_invariants=False)


def use_sparse(pre: Float[Tensor, "batch d_sae"], k: int) -> bool:
    """Whether the sparse step applies to this code size and device."""
    return pre.device.type in SPARSE_DEVICES and k <= SPARSE_MAX_DENSITY * pre.shape[-1]


def select(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"]]:
    """The k largest pre-activations of each token and their features, in no particular order."""
    return pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)


def per_token(pre: Float[Tensor, "batch d_sae"], k: int) -> Pairs:
    """TopK's pairs: each token's k largest pre-activations, ReLU applied (zeros stay as pairs)."""
    values, indices = select(pre, k)
    indices, order = indices.sort(dim=-1)  # CSR wants ascending columns within a row
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=pre.device)
    rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
    return Pairs(crow, indices.reshape(-1), rows, values.gather(-1, order).relu_().reshape(-1), pre.shape[-1])


def per_batch(pre: Float[Tensor, "batch d_sae"], k: int, hint: Tensor | None = None) -> Pairs:
    """Batch top-k's pairs: the k * batch largest positive pre-activations of the batch (all the positive
    ones when there are fewer; every value tied with the (k * batch)-th is kept). `hint`, about the last
    batch's smallest kept value, screens first.

    The selection's size is data-dependent, so on CUDA this waits for the device: reading the hint and
    once per screen tried (usually one)."""
    flat = pre.reshape(-1)
    n = min(k * pre.shape[0], flat.numel())
    last = float(hint) if hint is not None else 0.0
    screens = [last * margin for margin in SCREEN_MARGINS] if 0 < last < math.inf else []
    for floor in (*screens, 0.0):  # the last round screens out only the non-positive
        candidates = torch.nonzero(flat > floor).squeeze(1)  # ascending: token-major, features ascending
        if candidates.numel() >= n:
            break
    values = flat[candidates]
    if values.numel() > n:
        keep = values >= values.topk(n, sorted=False).values.min()
        candidates, values = candidates[keep], values[keep]
    rows, cols = candidates.div(pre.shape[-1], rounding_mode="floor"), candidates.remainder(pre.shape[-1])
    crow = torch.searchsorted(rows, torch.arange(pre.shape[0] + 1, device=pre.device))
    return Pairs(crow, cols, rows, values, pre.shape[-1])


def dense(pairs: Pairs) -> Float[Tensor, "batch d_sae"]:
    """The dense [batch, d_sae] code of `pairs` (by indexing: no sparse kernels, so any device)."""
    code = pairs.vals.new_zeros(pairs.crow.shape[0] - 1, pairs.d_sae)
    code[pairs.rows, pairs.cols] = pairs.vals
    return code


def decode(pairs: Pairs, W_dec: Float[Tensor, "d_sae d_out"]) -> Float[Tensor, "batch d_out"]:
    """sum over a token's pairs of value * W_dec[feature]: the decoder matmul over the active pairs only."""
    offsets = pairs.crow[:-1]
    return F.embedding_bag(pairs.cols, W_dec, offsets, mode="sum", per_sample_weights=pairs.vals)


def active_grads(
    pairs: Pairs, g_out: Float[Tensor, "batch d_out"], W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, " nnz"]:
    """<g_out_b, W_dec[i]> for every active pair (b, i): g_out @ W_dec^T sampled at the pairs."""
    sampled = torch.sparse.sampled_addmm(pairs.csr(pairs.vals), g_out, W_dec.T, beta=0.0)
    return sampled.values()


class FeatureMajor:
    """The active pairs sorted by feature: products summed per feature as a [d_sae, batch] CSR matrix."""

    def __init__(self, pairs: Pairs) -> None:
        self.order = pairs.cols.argsort(stable=True)  # pair positions grouped by feature, tokens ascending
        features = torch.arange(pairs.d_sae + 1, device=pairs.cols.device)
        self.crow = torch.searchsorted(pairs.cols[self.order], features)  # unlike bincount, no host sync on CUDA
        self.tokens, self.cols = pairs.rows[self.order], pairs.cols
        self.shape = (pairs.d_sae, pairs.crow.shape[0] - 1)

    def matmul(self, values: Float[Tensor, " nnz"], dense: Float[Tensor, "batch d"]) -> Float[Tensor, "d_sae d"]:
        """sum over a feature's pairs (b, i) of values * dense[b] into row i."""
        matrix = torch.sparse_csr_tensor(self.crow, self.tokens, values[self.order], self.shape, check_invariants=False)
        return matrix @ dense

    def sum(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, " d_sae"]:
        """sum over a feature's pairs of values into entry i."""
        return values.new_zeros(self.shape[0]).index_add_(0, self.cols, values)

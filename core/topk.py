"""The TopK step on its active (feature, value) pairs instead of the dense [batch, d_sae] code.

Only k of d_sae features are active per token, so past the (dense) encoder matmul and the top-k
selection every product can touch the active pairs alone:

    decode        y_hat = sum_j a_bj W_dec[i_bj]           embedding_bag over the pairs
    grad of a     g_bj = <g_out_b, W_dec[i_bj]>             sampled dense-dense matmul (SDDMM)
    grad W_dec    rows i: sum over its tokens a_bi g_out_b   feature-major CSR @ g_out
    grad W_enc    columns i: sum over its tokens g_bi xc_b   feature-major CSR @ xc

Measured on 2 CPU cores (bench/bench_train.py; batch 1024, d_sae 2304, k 64) each of these beats
its dense matmul by 2-4x; CUDA has the same kernels (cuSPARSE) where the gap is larger still.
Where the code is not sparse enough (k above SPARSE_MAX_DENSITY of d_sae) or the device lacks the
sparse kernels, core.train_steps uses the dense formulation.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

SPARSE_MAX_DENSITY = 1 / 8
"""Use the sparse step while k / d_sae is at most this (the default's 64 / 2304 is 1 / 36)."""
SPARSE_DEVICES = ("cpu", "cuda")
"""Devices with the CSR kernels the sparse step needs (sampled_addmm, CSR @ dense)."""
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def use_sparse(pre: Float[Tensor, "batch d_sae"], k: int) -> bool:
    """Whether the sparse step applies to this code size and device."""
    return pre.device.type in SPARSE_DEVICES and k <= SPARSE_MAX_DENSITY * pre.shape[-1]


def select(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"]]:
    """The k largest pre-activations of each token and their features, in no particular order."""
    return pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)


def decode(
    indices: Int[Tensor, "batch k"], acts: Float[Tensor, "batch k"], W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, "batch d_out"]:
    """sum_j acts[b, j] * W_dec[indices[b, j]]: the decoder matmul over the active pairs only."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=acts, mode="sum")


def active_grads(
    indices: Int[Tensor, "batch k"],
    acts: Float[Tensor, "batch k"],
    g_out: Float[Tensor, "batch d_out"],
    W_dec: Float[Tensor, "d_sae d_out"],
) -> Float[Tensor, "batch k"]:
    """<g_out_b, W_dec[i_bj]> for every active pair (b, j): g_out @ W_dec^T sampled at the pairs.

    `indices` must be ascending within each row."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)
    pattern = torch.sparse_csr_tensor(
        crow, indices.reshape(-1), acts.reshape(-1), (batch, W_dec.shape[0]), check_invariants=False
    )
    sampled = torch.sparse.sampled_addmm(pattern, g_out, W_dec.T, beta=0.0)
    return sampled.values().view(batch, k)


class FeatureMajor:
    """The active pairs sorted by feature: products summed per feature as a [d_sae, batch] CSR matrix."""

    def __init__(self, indices: Int[Tensor, "batch k"], d_sae: int) -> None:
        flat = indices.reshape(-1)
        self.order = flat.argsort(stable=True)  # pair positions grouped by feature, tokens ascending
        self.flat, self.k, self.d_sae = flat, indices.shape[1], d_sae
        features = torch.arange(d_sae + 1, device=indices.device)
        crow = torch.searchsorted(flat[self.order], features)  # row starts; unlike bincount, no host sync on CUDA
        self.crow, self.tokens, self.batch = crow, self.order // self.k, indices.shape[0]

    def matmul(self, values: Float[Tensor, "batch k"], dense: Float[Tensor, "batch d"]) -> Float[Tensor, "d_sae d"]:
        """sum over tokens b of values[b, j] * dense[b] into row indices[b, j]."""
        rows = values.reshape(-1)[self.order]
        matrix = torch.sparse_csr_tensor(self.crow, self.tokens, rows, (self.d_sae, self.batch), check_invariants=False)
        return matrix @ dense

    def sum(self, values: Float[Tensor, "batch k"]) -> Float[Tensor, " d_sae"]:
        """sum over tokens b of values[b, j] into entry indices[b, j]."""
        return values.new_zeros(self.d_sae).index_add_(0, self.flat, values.reshape(-1))
